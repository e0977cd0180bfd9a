from fusechat.cli import main

main()
