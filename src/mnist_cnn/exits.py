"""The exit statuses of `mnist-cnn`, defined once for the CLI, the launcher of several
processes (`train --nproc`) and the tests. Scripts may rely on them:

    0    OK: everything asked for was done
    1    FAILED: some inputs failed (predict: an image could not be read) or the machine
         did (disk full, permissions); each said why in one line
    2    USAGE: a problem the user can fix (a bad flag, path, file or value), said in one
         line on stderr
    130  INTERRUPTED: stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it);
         a training run saved its checkpoint first
"""

OK = 0
FAILED = 1
USAGE = 2
INTERRUPTED = 130
