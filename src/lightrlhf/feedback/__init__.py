"""Human feedback: a person compares two responses on a local web page; the labels train a reward model.

    candidates.jsonl  --(python -m lightrlhf.feedback serve)-->  labels.jsonl  (append-only, fsync'd)
    labels.jsonl      --(python -m lightrlhf.feedback export)--> prefs.jsonl   -> train.py stage=rm

candidates.py  the pairs to ask about, checked line by line
labels.py      the label file's records, undo, `read_labels` (the only reader)
store.py       `LabelStore`, its only writer: flock + fsync appends shared by threads and processes
server.py      the FastAPI app, `serve` and `serve_in_thread`; static/ holds the page (HTML, JS, CSS)
client.py      `FeedbackClient`, the same HTTP API from Python (urllib only)
export.py      labels -> {prompt, chosen, rejected}
stats.py       counts, Cohen's kappa, agreement with a reward model
"""
