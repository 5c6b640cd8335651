"""`python -m personavec` (also `accelerate launch -m personavec ...`): the command line."""

from personavec.cli import main

if __name__ == "__main__":
    main()
