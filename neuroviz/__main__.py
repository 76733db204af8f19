import sys

from .cli import BROKEN_PIPE_EXIT, main, silence_stdout

if __name__ == "__main__":
    code = main()
    try:
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe ends quietly too
    except BrokenPipeError:
        silence_stdout()
        code = BROKEN_PIPE_EXIT
    sys.exit(code)
