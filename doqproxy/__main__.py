from doqproxy.cli import main

main()
