from niphas_common.cli import main

main()
