"""The chapters' exercise self-checks, one module per paper (``exercises/<paper>.py``), kept out
of the method modules so that a method module holds only the method. Each ``check_*`` function
starts with :func:`minidistill.runtime.attempted`, so an unsolved exercise prints a hint."""
