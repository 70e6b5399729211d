from edgemed.cli import main

main()
