"""
relaygw-passwd [--delete] FILE USER: add, change or delete a user in a
relaygw password file.

The password is read twice from the terminal, or once (one line) from
standard input when that is not a terminal.  The file is created if missing
(mode 0600); an existing file keeps its mode (never readable by others),
owner and group.
"""

import argparse
import getpass
import sys

from relaygw.auth import PasswordFile, PasswordFileError, checkPassword


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage("%s\n%s" % (self.format_usage().rstrip(), message))


def _readPassword():
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise ValueError("the passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    checkPassword(password)
    return password


def main(argv=None):
    """
    Run the command.

    @return: the exit code, 0 or 1.
    """
    paragraphs = [" ".join(p.split()) for p in __doc__.strip().split("\n\n")]
    parser = _Parser(prog="relaygw-passwd", description=paragraphs[0], epilog=paragraphs[1])
    parser.add_argument("--delete", action="store_true", help="delete USER")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("user", metavar="USER")
    try:
        args = parser.parse_args(argv)
        passwords = PasswordFile(args.file)
        if args.delete:
            if not passwords.remove(args.user):
                raise ValueError("no user %r in %s" % (args.user, args.file))
        else:
            passwords.set(args.user, _readPassword())
    except OSError as e:  # (creating, locking or replacing it)
        print("relaygw-passwd: cannot change %s: %s" % (args.file, e.strerror or e), file=sys.stderr)
        return 1
    except (_Usage, ValueError, PasswordFileError, EOFError, KeyboardInterrupt) as e:
        print("relaygw-passwd: %s" % (e or type(e).__name__,), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
