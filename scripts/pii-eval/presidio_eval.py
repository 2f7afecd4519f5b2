#!/usr/bin/env python3
"""Score Microsoft Presidio's pattern recognizers on the pii-redactor evaluation set.

Same set, same criterion as filters/pii-redactor/tests/quality.rs: a result is correct when its type matches
a labelled entity it overlaps. Presidio's recognizers are called directly (no spaCy model: the NLP engine
needs a model download this environment cannot do, so context-word enhancement is not applied; recognizer
scores are used as they are). Reported at score thresholds 0.0 (AnalyzerEngine's default) and 0.5.

    python3 -m pip install -r scripts/pii-eval/requirements-presidio.txt
    python3 scripts/pii-eval/presidio_eval.py filters/pii-redactor/tests/data/pii_eval.jsonl 2>/dev/null

(stderr carries tldextract's failed attempt to download the public suffix list; it falls back to its
bundled snapshot.)
"""
import json
import sys
import time
from collections import defaultdict

from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    NhsRecognizer,
    PhoneRecognizer,
    UsSsnRecognizer,
)

RECOGNIZERS = [
    (EmailRecognizer(), "EMAIL_ADDRESS", {"email"}),
    (PhoneRecognizer(), "PHONE_NUMBER", {"phone"}),
    (CreditCardRecognizer(), "CREDIT_CARD", {"credit_card"}),
    (UsSsnRecognizer(), "US_SSN", {"us_ssn"}),
    (IbanRecognizer(), "IBAN_CODE", {"iban"}),
    (IpRecognizer(), "IP_ADDRESS", {"ipv4", "ipv6"}),
    (NhsRecognizer(), "UK_NHS", {"uk_nhs"}),
]
SUPPORTED = {t for _, _, ts in RECOGNIZERS for t in ts}


def main(path):
    rows = [json.loads(l) for l in open(path)]
    results = {}
    t0 = time.time()
    for threshold in (0.0, 0.5):
        score = defaultdict(lambda: [0, 0, 0])  # tp, fp, fn  (by our type names; ip merged)
        for row in rows:
            text = row["text"]
            gold = [(e["type"], e["start"], e["end"]) for e in row["entities"]]
            matched = [False] * len(gold)
            for rec, entity, types in RECOGNIZERS:
                for r in rec.analyze(text, [entity], None):
                    if r.score < threshold or r.score == 0:
                        continue
                    key = "ip" if entity == "IP_ADDRESS" else next(iter(types))
                    hit = next((i for i, (t, s, e) in enumerate(gold) if t in types and r.start < e and s < r.end), None)
                    if hit is None:
                        score[key][1] += 1
                    elif not matched[hit]:
                        matched[hit] = True
                        score[key][0] += 1
            for i, (t, s, e) in enumerate(gold):
                if not matched[i]:
                    key = "ip" if t in ("ipv4", "ipv6") else t
                    score[key][2] += 1
        results[threshold] = score
    elapsed = time.time() - t0
    print(f"{path}: {len(rows)} texts, Presidio {elapsed / 2:.2f} s per pass")
    print("| type | Presidio P (t=0) | Presidio R (t=0) | Presidio P (t=0.5) | Presidio R (t=0.5) |")
    print("|---|---|---|---|---|")
    keys = sorted(set(results[0.0]) | set(results[0.5]))
    for k in keys:
        cells = []
        for th in (0.0, 0.5):
            tp, fp, fn = results[th][k]
            if k not in SUPPORTED and k != "ip":
                cells += ["n/a", f"0.000 (no recognizer, {fn} missed)"]
                continue
            p = tp / (tp + fp) if tp + fp else 1.0
            r = tp / (tp + fn) if tp + fn else 1.0
            cells += [f"{p:.3f}", f"{r:.3f}"]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "filters/pii-redactor/tests/data/pii_eval.jsonl")
