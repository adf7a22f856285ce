"""The run itself: building the objects from the option records, the runner (prompt lines ->
files), scale-out over processes, the summary, the end of the process.
"""
