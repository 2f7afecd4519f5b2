#!/usr/bin/env python3
"""Generate the pii-redactor evaluation set of encoded values (deterministic: a fixed seed).

    python3 scripts/pii-eval/generate_encoded.py > filters/pii-redactor/tests/data/pii_eval_encoded.jsonl

Values percent-encoded in URLs and logs (`?email=jane.doe%40example.com`, `phone=%2B14155552671`,
`iban=DE89%203704...`, a form's `card=4111+1111+1111+1111`) and written with HTML character references (`jane&#64;example.com`,
`&plus;44&nbsp;20&nbsp;7946&nbsp;0958`, every character a numeric reference), 150 each for email, phone,
credit_card and iban, and 600 hard negatives written so (`%40` outside an address, npm scopes and Medium
handles, `&#64;handle`, encoded paths with dates and versions, order and invoice numbers in queries, prices
and dates with `&nbsp;`, `&amp;`, `&mdash;`). The values come from the generators of
`scripts/pii-eval/generate.py` (Faker 40.54, same locales), reseeded here, so the other two sets are not
changed. Same line format and offsets (characters; the set is ASCII).
"""
import importlib.util
import json
import os
import string
import sys
from urllib.parse import quote, quote_plus

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "generate", os.path.join(HERE, "generate.py"))
g = importlib.util.module_from_spec(spec)
sys.argv = sys.argv[:1]  # the base generator reads a seed from its arguments
spec.loader.exec_module(g)

SEED = 20261207
g.rnd.seed(SEED)
g.Faker.seed(SEED)
for i, f in enumerate(g.fk.values()):
    f.seed_instance(SEED + i)
rnd, us, N, GEN, ALNUM, pick, rstr = g.rnd, g.us, g.N, g.GEN, g.ALNUM, g.pick, g.rstr


def pct(v):
    """`v` as a URL query value: every reserved character percent-encoded (`@` %40, `+` %2B), a space as
    %20 (`encodeURIComponent`) or as `+` (a form body: HTML forms, `URLSearchParams`, `urlencode`)."""
    return quote(v, safe="") if rnd.random() < 0.6 else quote_plus(v, safe="")


def html_refs(v):
    """`v` written with HTML character references, in one of the spellings pages and obfuscators use."""
    style = rnd.random()
    if style < 0.25:
        return v.replace("@", pick(["&#64;", "&#064;", "&#x40;", "&#X40;", "&commat;"]))
    if style < 0.45:
        return v.replace("@", pick(["&#64;", "&commat;"])).replace(".", pick(["&#46;", "&period;"]))
    if style < 0.6:
        return "".join(f"&#{ord(c)};" if rnd.random() < 0.8 else c for c in v)
    return (v.replace("@", "&#x40;").replace("+", pick(["&plus;", "&#43;", "&#x2B;"]))
            .replace(" ", pick(["&nbsp;", "&#160;", "&#xA0;", "&thinsp;"])))


URL_TEMPLATES = {
    "email": ["https://app.example.com/reset?email={}&token=" + "{token}", "mailto:{}?subject=Hello%20there",
              "Click https://news.example.org/unsubscribe?u={}&list=weekly to stop", "GET /login?user={} HTTP/1.1 302",
              "next=%2Fsignup%3Femail%3D{}%26plan%3Dpro", "callback: https://crm.example.net/contacts?q={}"],
    "phone": ["sms:{}?body=Hello", "https://wa.example.com/send?phone={}&text=hi", "GET /lookup?phone={} HTTP/1.1",
              "https://crm.example.net/call?number={}&agent=7", "tel={}&name=Jane"],
    "credit_card": ["https://shop.example.com/pay?card={}&exp=04%2F27", "POST /charge card_number={}&cvc=123",
                    "debug: payment?cc={}&amount=12.00"],
    "iban": ["https://bank.example.com/transfer?iban={}&amount=100", "payout?account_iban={}&currency=EUR",
             "GET /sepa?iban={} HTTP/1.1"],
}
HTML_TEMPLATES = {
    "email": ["<p>Contact us at {}</p>", "<td>{}</td>", "Email: {}<br>", "<li>Owner: {}</li>", "Write to {} today."],
    "phone": ["<td>Tel: {}</td>", "<p>Call {} after 5pm</p>", "Phone:&nbsp;{}<br>", "<span class=tel>{}</span>"],
    "credit_card": ["<td>Card: {}</td>", "<p>Card number {} exp 04/27</p>"],
    "iban": ["<td>IBAN: {}</td>", "<p>Bank details: {}</p>"],
}

ENCODED_NEGATIVES = [
    lambda: f"https://registry.npmjs.org/%40{us.user_name()}%2F{us.word()}/-/{us.word()}-1.{rnd.randint(0, 9)}.0.tgz",
    lambda: f"https://unpkg.com/%40{us.word()}/{us.word()}@{rnd.randint(1, 9)}.{rnd.randint(0, 20)}.{rnd.randint(0, 9)}/dist/index.js",
    lambda: f"https://medium.com/%40{us.user_name()}/{us.slug()}-{rstr('0123456789abcdef', 12)}",
    lambda: f"the token {rstr(string.ascii_lowercase, 3)}%40{rstr(string.ascii_lowercase, 4)} is no address",
    lambda: f"utm_source=news%40letter&utm_medium=email&utm_campaign={us.word()}",
    lambda: f"<p>Follow us &#64;{us.user_name()} on social media</p>",
    lambda: f"<span>{pick(['&#64;', '&commat;', '&#x40;'])}</span> {us.word()} mentioned you",
    lambda: f"GET /files/{us.word().title()}%20Report%20{rnd.randint(2019, 2026)}-{rnd.randint(1, 12):02}-{rnd.randint(1, 28):02}.pdf HTTP/1.1",
    lambda: f"https://example.com/search?q=version%20{rnd.randint(1, 20)}.{rnd.randint(0, 30)}.{rnd.randint(0, 99)}%20release%20notes",
    lambda: f"https://shop.example.com/orders?q=order%20{''.join(str(rnd.randint(0, 9)) for _ in range(16))}",
    lambda: f"/invoices?ref=Invoice%20{rnd.randint(1000, 9999)}%20{rnd.randint(1000, 9999)}%20{rnd.randint(1000, 9999)}%20{rnd.randint(1000, 9999)}",
    lambda: f"/calendar?start={rnd.randint(10, 12)}%3A{rnd.randint(10, 59)}%3A{rnd.randint(10, 59)}&tz=UTC",
    lambda: f"https://maps.example.com/?q={rnd.uniform(-90, 90):.4f}%2C{rnd.uniform(-180, 180):.4f}",
    lambda: f"/track?id=1Z{rstr(string.ascii_uppercase + string.digits, 16)}&carrier=UPS",
    lambda: f"https://docs.example.com/{us.uri_path()}/C%2B%2B%20{us.word()}%20guide",
    lambda: f"q={us.word()}%20{us.word()}%20{us.word()}&page={rnd.randint(1, 50)}&sort=desc",
    lambda: f"<td>Price:&nbsp;${rnd.randint(1, 9)},{rnd.randint(100, 999)}.{rnd.randint(10, 99)}</td>",
    lambda: f"<td>{rnd.randint(100, 999)}&nbsp;{rnd.randint(100, 999)}&nbsp;{rnd.randint(100, 999)}.00&nbsp;USD</td>",
    lambda: f"<p>Released {rnd.randint(1, 28)}&nbsp;{pick(['Jan', 'Mar', 'Oct'])}&nbsp;{rnd.randint(1990, 2030)} &mdash; version&nbsp;{rnd.randint(1, 9)}.{rnd.randint(0, 9)}.{rnd.randint(0, 9)}</p>",
    lambda: f"<p>R&amp;D grew {rnd.randint(2, 60)}&#37; &ndash; {us.sentence()}</p>",
    lambda: f"<p>&copy;&nbsp;{rnd.randint(2000, 2026)} {us.company()} &middot; All rights reserved</p>",
    lambda: f"<td>Order&nbsp;#{rnd.randint(100000, 9999999)}</td><td>Qty&nbsp;{rnd.randint(1, 9)}</td>",
    lambda: f"Test card 4111&nbsp;1111&nbsp;1111&nbsp;111{rnd.choice([0, 2, 3, 4, 5, 6, 7, 8, 9])} declined (bad checksum)",
    lambda: f"up {rnd.randint(1, 99)}% in {rnd.randint(2000, 2026)}, {rnd.randint(1, 40)}%-{rnd.randint(41, 90)}% of %s and 100%40 done",
    lambda: f"Tom &amp; Jerry &lt;b&gt;{us.word()}&lt;/b&gt; &#9731; &#{rnd.randint(1000, 9000)};",
]


def encoded_main():
    out = []
    for typ in ["email", "phone", "credit_card", "iban"]:
        for k in range(N):
            encode = pct if k % 2 == 0 else html_refs
            # Only values the encoding changes (a compact IBAN or a dashed phone number has nothing to encode).
            while True:
                plain = GEN[typ]()
                value = encode(plain)
                if value != plain:
                    break
            if k % 2 == 0:
                t = pick(URL_TEMPLATES[typ]).replace("{token}", rstr(ALNUM, 24))
            else:
                t = pick(HTML_TEMPLATES[typ])
            before, after = t.split("{}")
            out.append({"text": before + value + after,
                        "entities": [{"type": typ, "start": len(before), "end": len(before) + len(value)}]})
    for _ in range(600):
        out.append({"text": pick(ENCODED_NEGATIVES)(), "entities": []})
    rnd.shuffle(out)
    for o in out:
        assert o["text"].isascii(), o
        sys.stdout.write(json.dumps(o, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    encoded_main()
