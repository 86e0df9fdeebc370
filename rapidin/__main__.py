from rapidin.cli import main

main()
