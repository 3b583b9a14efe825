from mesh.cli.main import main

main()
