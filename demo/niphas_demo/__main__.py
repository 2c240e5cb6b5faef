from niphas_demo.cli import main

main()
