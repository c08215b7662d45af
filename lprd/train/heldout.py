"""Write the held-out label files that `lprd eval` scores: `python -m lprd.train.heldout DIR`.

Scenes held out from the detector (its split: by video or source) and plate texts held out from
the reader (its split: by text), so that one command gives honest end-to-end figures. Plates
that the labels miss (`heldout_unlabelled.json`, checked by eye) are added with "ignore": true.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lprd.train.detector import unlabelled_plates
from lprd.train.reader_data import DATA_ROOT, is_heldout
from lprd.train.scenes import SCENE_SETS, is_held_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lprd.train.heldout", description=__doc__)
    ap.add_argument("out", type=Path, help="folder for <set>.jsonl and reader_heldout_texts.txt")
    ap.add_argument("--data", type=Path, default=DATA_ROOT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    texts: set[str] = set()
    unlabelled = unlabelled_plates()
    for s in sorted(p.name for p in args.data.iterdir() if (p / "labels.jsonl").is_file()):
        recs = [json.loads(line) for line in (args.data / s / "labels.jsonl").open()]
        texts |= {p["text"] for r in recs for p in r["plates"] if p["text"] and is_heldout(p["text"])}
        if s not in SCENE_SETS:
            continue
        test_texts = frozenset(
            p["text"] for r in recs if r.get("split") == "test" for p in r["plates"] if p["text"]
        ) if s == "us_ca_parking" else frozenset()
        keep = [r for r in recs if is_held_out(s, r, test_texts)[0]]
        for r in keep:  # plates the labels miss, checked by eye: not scored
            r["plates"] = r["plates"] + [{"text": None, "box": list(b), "ignore": True}
                                         for b in unlabelled.get(f"{s}/{r['image']}", [])]
        (args.out / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
        print(f"{s}: {len(keep)} of {len(recs)} scenes held out")
    (args.out / "reader_heldout_texts.txt").write_text("".join(t + "\n" for t in sorted(texts)))
    print(f"reader held-out texts: {len(texts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
