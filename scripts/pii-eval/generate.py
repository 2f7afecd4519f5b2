#!/usr/bin/env python3
"""Generate the pii-redactor labelled evaluation set (deterministic: fixed seeds).

Writes JSON lines {"text": ..., "entities": [{"type", "start", "end"}]} with character offsets (the set is
ASCII, so byte and character offsets agree). Positives come from Faker (several locales) and from
generators of secret shapes (gitleaks rules); every sentence template is written by hand, some with a
context word ("call", "card", ...) and some without. Hard negatives have no entity: order numbers that
fail Luhn, dates, version strings, UUIDs, tracking ids, prices, hashes, invalid SSNs/IBANs, MAC addresses...

    python3 scripts/pii-eval/generate.py > filters/pii-redactor/tests/data/pii_eval.jsonl
    python3 scripts/pii-eval/generate.py 7 > filters/pii-redactor/tests/data/pii_eval_holdout.jsonl

The first set was used while developing the detectors; the second (another seed, generated after the
detectors were frozen) is the held-out check.
"""
import base64
import json
import random
import string
import sys

from faker import Faker

SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 20261122
rnd = random.Random(SEED)
Faker.seed(SEED)
fk = {loc: Faker(loc) for loc in ["en_US", "en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT"]}
for i, f in enumerate(fk.values()):
    f.seed_instance(SEED + i)
us, gb = fk["en_US"], fk["en_GB"]
N = 150  # positives per type


def pick(xs):
    return rnd.choice(xs)


def rstr(alphabet, n):
    return "".join(rnd.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
B32 = string.ascii_uppercase + "234567"


def luhn_ok(d):
    s = 0
    for i, c in enumerate(reversed(d)):
        v = int(c)
        if i % 2 == 1:
            v *= 2
            if v > 9:
                v -= 9
        s += v
    return s % 10 == 0


def nhs():
    while True:
        d = [rnd.randint(0, 9) for _ in range(9)]
        if d[0] == 0:
            continue
        s = sum(v * (10 - i) for i, v in enumerate(d))
        c = (11 - s % 11) % 11
        if c == 10:
            continue
        n = "".join(map(str, d)) + str(c)
        return pick([f"{n[:3]} {n[3:6]} {n[6:]}", f"{n[:3]} {n[3:6]} {n[6:]}", f"{n[:3]}-{n[3:6]}-{n[6:]}"])


def card():
    kind = pick(["visa16", "visa13", "mastercard", "amex", "discover", "jcb", "diners", "maestro"])
    num = us.credit_card_number(card_type=kind)
    style = rnd.random()
    if style < 0.4:
        return num
    sep = " " if style < 0.75 else "-"
    if len(num) == 15:
        return sep.join([num[:4], num[4:10], num[10:]])
    return sep.join(num[i:i + 4] for i in range(0, len(num), 4))


def iban():
    loc = pick(list(fk))
    v = fk[loc].iban()
    if rnd.random() < 0.5:
        v = " ".join(v[i:i + 4] for i in range(0, len(v), 4))
    return v


def phone():
    r = rnd.random()
    if r < 0.45:
        return us.phone_number()
    if r < 0.7:
        return gb.phone_number()
    if r < 0.8:
        return fk["de_DE"].phone_number()
    if r < 0.9:
        return fk["fr_FR"].phone_number()
    return "+" + str(rnd.choice([1, 44, 49, 33, 34, 39, 31, 61, 81])) + " " + " ".join(
        str(rnd.randint(100, 999)) for _ in range(3))


def jwt():
    h = base64.urlsafe_b64encode(json.dumps({"alg": pick(["HS256", "RS256"]), "typ": "JWT"}).encode()).rstrip(b"=").decode()
    p = base64.urlsafe_b64encode(json.dumps({"sub": us.uuid4(), "name": us.name(), "iat": rnd.randint(1e9, 2e9)}).encode()).rstrip(b"=").decode()
    return f"{h}.{p}.{rstr(ALNUM + '-_', 43)}"


def private_key():
    kind = pick(["RSA ", "EC ", "OPENSSH ", ""])
    body = "\n".join(rstr(ALNUM + "+/", 64) for _ in range(rnd.randint(3, 8)))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"


GEN = {
    "email": lambda: pick([us.email(), us.free_email(), us.company_email(), gb.email(), fk["de_DE"].email(),
                           f"{us.user_name()}+{rstr(string.ascii_lowercase, 4)}@{us.domain_name(2)}"]),
    "phone": phone,
    "credit_card": card,
    "us_ssn": lambda: us.ssn(),
    "iban": iban,
    "ipv4": lambda: pick([us.ipv4(), us.ipv4_private(), us.ipv4_public()]),
    "ipv6": lambda: us.ipv6(),
    "uk_nhs": nhs,
    "aws_access_key": lambda: pick(["AKIA", "ASIA"]) + rstr(B32, 16),
    "github_token": lambda: pick(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + rstr(ALNUM, 36)
    if rnd.random() < 0.8 else "github_pat_" + rstr(ALNUM + "_", 82),
    "openai_key": lambda: pick(["sk-proj-", "sk-svcacct-", "sk-admin-"]) + rstr(ALNUM + "-_", 58) + "T3BlbkFJ" + rstr(ALNUM + "-_", 58)
    if rnd.random() < 0.8 else "sk-" + rstr(ALNUM, 20) + "T3BlbkFJ" + rstr(ALNUM, 20),
    "anthropic_key": lambda: "sk-ant-api03-" + rstr(ALNUM + "-_", 93) + "AA",
    "slack_token": lambda: pick(["xoxb-", "xoxp-", "xoxe-"]) + "-".join(str(rnd.randint(10**11, 10**12)) for _ in range(2)) + "-" + rstr(ALNUM, 24)
    if rnd.random() < 0.8 else "https://hooks.slack.com/services/T" + rstr(B32, 8) + "/B" + rstr(B32, 8) + "/" + rstr(ALNUM, 24),
    "google_api_key": lambda: "AIza" + rstr(ALNUM + "-_", 35),
    "stripe_key": lambda: pick(["sk", "rk"]) + "_" + pick(["test", "live"]) + "_" + rstr(ALNUM, rnd.choice([24, 34, 99])),
    "huggingface_token": lambda: "hf_" + rstr(string.ascii_letters, 34),
    "private_key": private_key,
    "jwt": jwt,
}

# Templates: {} is the value. Mixed: with and without context words, start/middle/end, punctuation.
TEMPLATES = {
    "email": ["Please send the report to {}.", "{} wrote to us yesterday", "Contact: {}", "cc {} and the team",
              "My address is {}, thanks!", "({}) asked for a refund", "Reply-To: <{}>", "forwarding from {} - see below"],
    "phone": ["Call me at {} after 5pm.", "Phone: {}", "You can reach Jane on {} tomorrow.", "Tel. {}",
              "{} is the after-hours line", "mobile {} (personal)", "Her number is {}.", "Jane Doe, {}, Springfield",
              "Customer called from {} about the invoice", "Fax: {}"],
    "credit_card": ["My card number is {} exp 04/27", "Charge {} please", "Card: {}", "payment with {} failed",
                    "Use the Visa {} for the booking", "{} was declined"],
    "us_ssn": ["My SSN is {}.", "SSN: {}", "social security number {} on file", "Applicant {} (ssn)",
               "The form lists {} as the SSN", "ssn={}"],
    "iban": ["Please transfer to IBAN {} by Friday.", "IBAN: {}", "Account {} (Sparkasse)", "wire the money to {} today",
             "Bank details: {}", "my iban is {}"],
    "ipv4": ["Server {} is down.", "Login from IP {} blocked", "ping {}", "client_ip={}", "The request came from {}.",
             "Whitelist {} please"],
    "ipv6": ["Server {} is down.", "Login from {} blocked", "ping6 {}", "client ip: {}", "Route traffic to [{}]"],
    "uk_nhs": ["NHS number {}", "Patient NHS No: {}", "nhs {} registered at the GP", "Her NHS number is {}."],
}
SECRET_TEMPLATES = ["export KEY={}", "Here is my key: {} - why does it fail?", "token = \"{}\"", "Authorization: Bearer {}",
                    "use {} for the staging env", "config:\n  api_key: {}\n"]

NEGATIVES = [
    lambda: f"Order {''.join(str(rnd.randint(0, 9)) for _ in range(16))} has shipped.",
    lambda: f"Invoice {rnd.randint(1000, 9999)} {rnd.randint(1000, 9999)} {rnd.randint(1000, 9999)} {rnd.randint(1000, 9999)} is overdue.",
    lambda: f"Released on {rnd.randint(1990, 2030)}-{rnd.randint(1, 12):02}-{rnd.randint(1, 28):02} at {rnd.randint(0, 23):02}:{rnd.randint(0, 59):02}:{rnd.randint(0, 59):02}.",
    lambda: f"Meeting on {rnd.randint(1, 12):02}/{rnd.randint(1, 28):02}/{rnd.randint(1990, 2030)} in room {rnd.randint(100, 999)}.",
    lambda: f"Upgrade to version {rnd.randint(1, 20)}.{rnd.randint(0, 30)}.{rnd.randint(0, 99)} now.",
    lambda: f"Running kernel {rnd.randint(2, 6)}.{rnd.randint(0, 19)}.{rnd.randint(0, 200)}-generic",
    lambda: f"version {rnd.randint(1, 12)}.{rnd.randint(0, 9)}.{rnd.randint(0, 9)}.{rnd.randint(0, 9999)} fixes the crash",
    lambda: f"Request id {us.uuid4()} failed",
    lambda: f"Tracking number 1Z{rstr(string.ascii_uppercase + string.digits, 16)}",
    lambda: f"FedEx tracking {rnd.randint(10**11, 10**12 - 1)}",
    lambda: f"It costs ${rnd.randint(1, 9)},{rnd.randint(100, 999)}.{rnd.randint(10, 99)} or EUR {rnd.randint(1, 9)}.{rnd.randint(100, 999)},{rnd.randint(10, 99)}",
    lambda: f"Price: {rnd.randint(100, 999)} {rnd.randint(100, 999)} {rnd.randint(100, 999)}.00 USD",
    lambda: f"commit {rstr('0123456789abcdef', 40)} broke the build",
    lambda: f"sha256 {rstr('0123456789abcdef', 64)}",
    lambda: f"ISBN 978-{rnd.randint(0, 9)}-{rnd.randint(10, 99)}-{rnd.randint(100000, 999999)}-{rnd.randint(0, 9)}",
    lambda: f"SSN placeholder {pick(['000', '666', '9' + str(rnd.randint(10, 99))])}-{rnd.randint(10, 99)}-{rnd.randint(1000, 9999)} is invalid",
    lambda: f"The sample SSN 123-45-6789 is not real",
    lambda: f"Test card 4111 1111 1111 111{rnd.choice([0, 2, 3, 4, 5, 6, 7, 8, 9])} declined (bad checksum)",
    lambda: bad_iban(),
    lambda: f"MAC {':'.join(rstr('0123456789ABCDEF', 2) for _ in range(6))} joined",
    lambda: f"The meeting runs {rnd.randint(10, 12)}:{rnd.randint(10, 59)}:{rnd.randint(10, 59)} to {rnd.randint(13, 17)}:00",
    lambda: f"Coordinates {rnd.uniform(-90, 90):.4f}, {rnd.uniform(-180, 180):.4f}",
    lambda: f"Use sk-{rstr(string.ascii_lowercase, 6)} as the prefix for skins",
    lambda: f"SKU-{rnd.randint(10000, 99999)}-XL is out of stock",
    lambda: f"Build {rnd.randint(2020, 2026)}{rnd.randint(10, 12)}{rnd.randint(10, 28)}.{rnd.randint(1, 9)} passed",
    lambda: f"Pi is 3.14159 and e is 2.71828; ratio {rnd.randint(1, 99)}.{rnd.randint(1, 99)}%",
    lambda: f"Postcode {gb.postcode()} and zip {us.zipcode()}",
    lambda: f"Ticket #{rnd.randint(100000, 9999999)} was closed",
    lambda: f"Use the email field (not user@localhost) for the login",
    lambda: f"Account number {rnd.randint(10**9, 10**10 - 1)} belongs to nobody" if False else f"Reference {rnd.randint(10**7, 10**8 - 1)} confirmed",
    lambda: f"Population grew from {rnd.randint(1, 999)},{rnd.randint(100, 999)},{rnd.randint(100, 999)} people",
    lambda: f"{us.sentence()} {us.sentence()}",
    lambda: f"See https://example.com/{us.uri_path()}?id={rnd.randint(1, 10**6)}",
    lambda: f"Score {rnd.randint(100, 999)}-{rnd.randint(10, 99)} final",
    lambda: f"Serial {rstr(string.ascii_uppercase, 4)}-{rstr(string.digits, 4)}-{rstr(string.ascii_uppercase + string.digits, 4)}",
    lambda: f"eyes on the prize and eyebrows raised",
    lambda: f"hf_ prefix is for hugging face; AKIA is for AWS; ghp_ is GitHub",
]


def bad_iban():
    v = fk[pick(list(fk))].iban()
    d = str((int(v[2:4]) + rnd.randint(1, 50)) % 97 + 2).zfill(2)  # wrong check digits (ignoring wrap luck)
    v = v[:2] + d + v[4:]
    return f"IBAN {v} looks wrong"


def main():
    out = []
    for typ, gen in GEN.items():
        temps = TEMPLATES.get(typ, SECRET_TEMPLATES)
        for _ in range(N):
            value = gen()
            t = pick(temps)
            before, after = t.split("{}")
            text = before + value + after
            out.append({"text": text, "entities": [{"type": typ, "start": len(before), "end": len(before) + len(value)}]})
    negs = []
    for _ in range(1200):
        negs.append({"text": pick(NEGATIVES)(), "entities": []})
    out.extend(negs)
    rnd.shuffle(out)
    for o in out:
        assert o["text"].isascii(), o
        sys.stdout.write(json.dumps(o, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
