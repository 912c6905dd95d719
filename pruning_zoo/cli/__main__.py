from pruning_zoo.cli import main

main()
