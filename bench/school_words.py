"""Vocabulary of ordinary school mail, shared by the benchmarks' message generators."""

WORDS = (  # noqa: SIM905 - prose reads better than a word list
    "the pupils will visit the museum on thursday and should bring a packed lunch waterproof coat "
    "and their history exercise books photosynthesis chlorophyll equation revision sports day netball "
    "fixtures against bedford results were excellent congratulations to year nine parents evening "
    "appointments can be booked online library books are due back before the holidays"
).split()
