from mlgen.cli.app import main

main()
