"""python -m lightrlhf.feedback serve|export|stats

  serve  CANDIDATES --out LABELS [--host 127.0.0.1] [--port 8765] [--token SECRET]
         the labelling page; every label is appended to LABELS and fsync'd before the page moves on
  export LABELS --candidates CANDIDATES [CANDIDATES ...] --out PREFS
         TRL-style {prompt, chosen, rejected} rows for `train.py stage=rm data=jsonl data.path=PREFS`
  stats  LABELS [--candidates CANDIDATES ...] [--reward-model EXPORT] [--json]
         per-annotator counts, Cohen's kappa on shared pairs, agreement with a reward model

A mistake in what was given (a file, a port, an address) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from lightrlhf.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.feedback", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ap.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the labelling page")
    serve.add_argument("candidates", help="candidates.jsonl: {id, prompt, a, b, ...} a line")
    serve.add_argument("--out", required=True, help="the label file (created if missing, only ever appended to)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                           "needs --token)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    serve.add_argument("--token", default=None, help="a secret every request must carry (?token= or "
                                                     "Authorization: Bearer); required beyond 127.0.0.1")
    export = commands.add_parser("export", help="write preference pairs for reward-model training")
    export.add_argument("labels", help="the label file")
    export.add_argument("--candidates", nargs="+", required=True, help="the candidates file(s) the labels are of")
    export.add_argument("--out", required=True, help="prefs.jsonl to write")
    stats = commands.add_parser("stats", help="counts and agreement")
    stats.add_argument("labels", help="the label file")
    stats.add_argument("--candidates", nargs="+", default=None, help="candidates file(s) (needed with "
                                                                     "--reward-model)")
    stats.add_argument("--reward-model", default=None, help="a reward-model export dir to compare with")
    stats.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.command == "serve":
        from lightrlhf.feedback.server import serve

        serve(args.candidates, args.out, host=args.host, port=args.port, token=args.token,
              announce=lambda line: print(line, flush=True))
    elif args.command == "export":
        from lightrlhf.feedback.export import export_preferences

        print(export_preferences(args.labels, args.candidates, args.out).describe(args.out))
    else:
        from lightrlhf.feedback.export import read_all_candidates
        from lightrlhf.feedback.labels import read_label_file
        from lightrlhf.feedback.stats import describe, label_stats, reward_model_scores

        log = read_label_file(args.labels)
        scores = None
        if args.reward_model is not None:
            if not args.candidates:
                raise UserError("--reward-model: give --candidates too (the texts the labels are of)")
            from lightrlhf.launch.quiet import quiet

            quiet()  # the known-harmless notices of transformers and peft, as train.py filters them
            candidates = read_all_candidates(args.candidates)
            wanted = {label.id for label in log.labels if label.choice in ("a", "b")}
            scores = reward_model_scores(args.reward_model, [c for id, c in candidates.items() if id in wanted])
        report = label_stats(log.labels, scores)
        print(json.dumps(asdict(report), indent=2, ensure_ascii=False) if args.json else describe(report))
        if log.torn:
            print(f"note: {log.torn}: a torn last line (a crash mid-write) was skipped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # read_label_file's own notes are printed here
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
