from trace_lib.cli import main

main()
