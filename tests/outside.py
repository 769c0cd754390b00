"""Files outside a spool, for the tests that plant symbolic links in it."""

import os


class OutsideFiles:
    """Files in C{self.outside} (a directory the test makes outside the spool), and checks on them."""

    def outsideFile(self, name, content):
        path = os.path.join(self.outside, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def assertContent(self, path, content):
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content)
