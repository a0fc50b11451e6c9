from zbroker.cli import main

main()
