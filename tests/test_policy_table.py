"""The school's policy, case by case: each message with the action and clause a school expects.

Envelopes: mail from a school address with no wire facts counts as sent by that person
(as `scan` does); inbound cases give an outside client address.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from milter.engine import scan
from milter.envelope import Envelope
from milter.policy.loader import Rules
from tests.mail import build

STAFF = "j.hughes@redborne.example"
STAFF2 = "a.patel@redborne.example"
STUDENT = "sam.taylor@students.redborne.example"
STUDENT2 = "priya.shah@students.redborne.example"
PARENTS = [
    "jane.taylor@gmail.example",
    "david.taylor@outlook.example",
    "anita.shah@yahoo.example",
    "raj.shah@btinternet.example",
    "claire.brown@hotmail.example",
]
OUTSIDER = "someone@elsewhere.example"
INBOUND = {"client_address": "203.0.113.9"}


@dataclass
class Case:
    id: str
    raw: bytes
    action: str
    # (detector, clause) pairs that must be among the findings; empty = no finding above mild needed
    expect: tuple[tuple[str, str], ...] = ()
    envelope: dict[str, object] = field(default_factory=dict)
    # detectors that must NOT report anything
    absent: tuple[str, ...] = ()
    alerts: tuple[str, ...] = ()


def out(body: str, subject: str = "Note", html: str | None = None, **kw: object) -> bytes:
    """Mail from staff to an outside address."""
    return build(STAFF, OUTSIDER, subject, body, html, **kw)  # type: ignore[arg-type]


def inbound(body: str, subject: str = "Hello", html: str | None = None, **kw: object) -> bytes:
    return build(OUTSIDER, STAFF, subject, body, html, **kw)  # type: ignore[arg-type]


CLEAN = ("obscene_language", "safeguarding_concern", "offensive_links", "missing_bcc", "advertising")

CASES = [
    # --- ordinary school mail: biology, history, literature, sport, places ---------------
    Case(
        "biology-reproduction",
        build(
            STAFF,
            STUDENT,
            "Homework",
            "Read about sexual and asexual reproduction "
            "in flowering plants; label the stamen, anther and stigma. Then do the analysis of the results.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "biology-human",
        build(
            STAFF,
            STUDENT,
            "Revision",
            "The human reproductive system: label the uterus, "
            "ovaries, testes and sperm duct. Breast tissue and the menstrual cycle are on the syllabus.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "history-wars",
        build(
            STAFF,
            STUDENT,
            "WW1 essay",
            "Explain why so many soldiers were killed at the "
            "Somme, and how Nazi propaganda and the Holocaust shaped the war. "
            "Discuss the slave trade in Bristol.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "literature-dick",
        build(
            STAFF,
            STUDENT,
            "Reading list",
            "This term: Moby Dick, Great Expectations by "
            "Charles Dickens, Of Mice and Men, and Romeo and Juliet, whose suicide ends the play.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "sport-fixtures",
        build(
            STAFF,
            STUDENT,
            "Netball and rugby",
            "Great result: we thrashed Bedford 24-3. "
            "Our hooker threw in perfectly and the shooters were brilliant. "
            "Cocktail sausages after the match.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "places",
        build(
            STAFF,
            STUDENT,
            "Geography trip",
            "Coach stops: Scunthorpe, Penistone, Cockermouth, "
            "Middlesex, Essex and Sussex. Lunch at Hancock's cafe, then the Cockburn museum.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "food",
        build(
            STAFF,
            STAFF2,
            "Canteen menu",
            "Thursday: shiitake mushroom risotto, grape salad, and spotted dick with custard.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "assessment-words",
        build(
            STAFF,
            STAFF2,
            "Assessment",
            "Please assess the classic texts; the school "
            "therapist will join the analysis meeting. Passing the class assessment matters.",
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "parent-question-inbound",
        build(
            PARENTS[0],
            STAFF,
            "Homework",
            "Hi, Sam was confused by the maths homework, could you send the worksheet again? Thanks, Jane",
        ),
        "accept",
        envelope=INBOUND,
        absent=CLEAN,
    ),
    Case(
        "internal-staff-note",
        build(STAFF, STAFF2, "Cover", "Can you cover period 3 tomorrow? Year 9 are doing the Tudors."),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "newsletter-bcc",
        build(
            "office@redborne.example",
            "office@redborne.example",
            "Redborne News",
            "News",
            "<h1>Redborne News</h1><p>Sports day is on Friday.</p>",
            bcc=PARENTS,
        ),
        "accept",
        absent=CLEAN,
    ),
    Case(
        "suicide-prevention-training",
        build(
            STAFF,
            STAFF2,
            "Training",
            "Reminder: suicide prevention training for all tutors on Monday after school.",
        ),
        "accept",
        absent=("safeguarding_concern",),
    ),
    Case(
        "self-harm-awareness",
        build(
            STAFF,
            STAFF2,
            "PSHE",
            "Next week's PSHE lesson is self-harm awareness; resources are on the drive.",
        ),
        "accept",
        absent=("safeguarding_concern",),
    ),
    Case(
        "killed-myself-laughing",
        build(STUDENT, STUDENT2, "lol", "that video was so funny i nearly killed myself laughing"),
        "accept",
        absent=("safeguarding_concern",),
    ),
    Case(
        "cut-myself-dt",
        build(
            STUDENT,
            STAFF,
            "DT",
            "Sorry I was late, I cut myself on the craft knife in woodwork and went to the nurse.",
        ),
        "accept",
        absent=("safeguarding_concern",),
    ),
    Case(
        "surprise-party",
        build(
            STAFF,
            STUDENT,
            "Shh",
            "We are planning a surprise party for Mr Evans, "
            "don't tell your parents who might mention it to him!",
        ),
        "accept",
        absent=("safeguarding_concern",),
    ),
    Case(
        "non-uniform",
        build(
            STAFF,
            STUDENT,
            "Friday",
            "What are you wearing for non-uniform day? Remember it is £1 for charity.",
        ),
        "accept",
        absent=("safeguarding_concern",),
    ),
    Case(
        "disclaimer",
        inbound(
            "Please find the invoice attached.\n\nIf you are not the intended recipient "
            "please delete this message."
        ),
        "accept",
        envelope=INBOUND,
        absent=("safeguarding_concern",),
    ),
    Case(
        "cake-sale",
        build(STAFF, STAFF2, "Cake sale", "Cakes for sale in the hall at break, 50p each."),
        "accept",
        absent=("advertising",),
    ),
    Case(
        "newsletter-unsubscribe",
        build(
            "office@redborne.example",
            "office@redborne.example",
            "News",
            "Term dates are attached. To unsubscribe from the newsletter, reply STOP.",
            bcc=PARENTS,
        ),
        "accept",
        absent=("advertising",),
    ),
    Case(
        "two-parents-to",
        build(STAFF, PARENTS[:2], "Sam", "Dear Mr and Mrs Taylor, Sam did well today."),
        "accept",
        absent=("missing_bcc",),
    ),
    Case(
        "short-caps-subject",
        build(STAFF, STAFF2, "PE KIT", "Please remind Year 7 to bring PE kit."),
        "accept",
        absent=("shouting",),
    ),
    Case(
        "acronyms",
        build(
            STAFF,
            STAFF2,
            "Exams",
            "GCSE and AQA entries, SATs results and the PTA meeting "
            "are on the agenda for the SLT briefing, see the INSET notes.",
        ),
        "accept",
        absent=("shouting",),
    ),
    Case(
        "clean-link",
        build(STAFF, STUDENT, "Reading", "See https://www.bbc.co.uk/bitesize for revision."),
        "accept",
        absent=("offensive_links",),
    ),
    Case("empty-body", build(STAFF, STAFF2, "", ""), "accept", absent=CLEAN),
    # --- obscene and abusive language, in every evasion form --------------------------------
    Case(
        "plain-outbound",
        out("This is fucking ridiculous."),
        "reject",
        (("obscene_language", "5.5"),),
        alerts=("slt",),
    ),
    Case("leet-sh1t", out("Your service is sh1t."), "reject", (("obscene_language", "5.5"),)),
    Case("leet-asshole", out("You are an @sshole."), "reject", (("obscene_language", "5.5"),)),
    Case("leet-dollar", out("What a load of $hit."), "reject", (("obscene_language", "5.5"),)),
    Case("cyrillic", out("This is fu\u0441king late."), "reject", (("obscene_language", "5.5"),)),
    Case("fullwidth", out("Ｆｕｃｋ this."), "reject", (("obscene_language", "5.5"),)),
    Case("zero-width", out("Absolute fu\u200bck\u200cing joke."), "reject", (("obscene_language", "5.5"),)),
    Case("stretched", out("fuuuuuuck off"), "reject", (("obscene_language", "5.5"),)),
    Case("spaced", out("you are a f u c k i n g idiot"), "reject", (("obscene_language", "5.5"),)),
    Case("dotted", out("what the f.u.c.k is this"), "reject", (("obscene_language", "5.5"),)),
    Case("masked-stars", out("what the f**k is this"), "reject", (("obscene_language", "5.5"),)),
    Case("masked-sh-t", out("this is sh*t work"), "reject", (("obscene_language", "5.5"),)),
    Case("accents", out("fück off"), "reject", (("obscene_language", "5.5"),)),
    Case(
        "html-split",
        out("see html", html="<p>you are all s<b></b>hit</p>"),
        "reject",
        (("obscene_language", "5.5"),),
    ),
    Case(
        "hidden-html",
        out("Fine.", html='<p>Fine.</p><div style="display:none">fuck you</div>'),
        "reject",
        (("obscene_language", "5.5"),),
    ),
    Case(
        "subject-only",
        out("See subject.", subject="shit delivery again"),
        "reject",
        (("obscene_language", "5.5"),),
    ),
    Case(
        "attachment-name",
        out("Attached.", attachments=[("fuck-you.pdf", b"%PDF-1.4", "application/pdf")]),
        "reject",
        (("obscene_language", "5.5"),),
    ),
    Case("slur", out("Tell that retard to hurry up."), "reject", (("obscene_language", "5.5"),)),
    Case("threat", out("If you do that again I will kill you."), "reject", (("obscene_language", "5.5"),)),
    Case(
        "student-internal",
        build(STUDENT, STUDENT2, "hey", "ur such a dickhead"),
        "reject",
        (("obscene_language", "5.5"),),
    ),
    Case(
        "inbound-obscene",
        inbound("fuck you and your school"),
        "quarantine",
        (("obscene_language", "5.7"),),
        envelope=INBOUND,
        alerts=("slt",),
    ),
    Case(
        "inbound-leet",
        inbound("y0u are a c*nt"),
        "quarantine",
        (("obscene_language", "5.7"),),
        envelope=INBOUND,
    ),
    Case(
        "inbound-subject-cyrillic",
        inbound("hello", subject="fu\u0441k you"),
        "quarantine",
        (("obscene_language", "5.7"),),
        envelope=INBOUND,
    ),
    Case(
        "authenticated-sender",
        build(STAFF, OUTSIDER, "x", "bullshit"),
        "reject",
        (("obscene_language", "5.5"),),
        envelope={"auth_user": STAFF, "client_address": "198.51.100.7"},
    ),
    # --- parent mailings and Bcc ------------------------------------------------------------
    Case(
        "parents-in-to",
        build("office@redborne.example", PARENTS, "Trip", "Consent forms by Friday."),
        "reject",
        (("missing_bcc", "appendix"),),
    ),
    Case(
        "parents-in-cc",
        build(STAFF, PARENTS[0], "Trip", "Consent forms.", cc=PARENTS[1:4]),
        "reject",
        (("missing_bcc", "appendix"),),
    ),
    Case(
        "parents-in-bcc",
        build(STAFF, STAFF, "Trip", "Consent forms.", bcc=PARENTS),
        "accept",
        absent=("missing_bcc",),
    ),
    Case(
        "parent-reply-all-inbound",
        build(PARENTS[0], [STAFF, *PARENTS[1:]], "Re: Trip", "Thanks!"),
        "accept",
        envelope=INBOUND,
        absent=("missing_bcc",),
    ),
    # --- bulk sends -------------------------------------------------------------------------
    Case(
        "5mb-to-200-staff",
        build(
            STAFF,
            STAFF2,
            "Photos",
            "Photos attached.",
            attachments=[("photos.zip", b"\0" * 5_000_000, "application/zip")],
        ),
        "reject",
        (("bulk_weight", "1.2"),),
        envelope={"rcpt_to": tuple(f"staff{i}@redborne.example" for i in range(200))},
    ),
    Case(
        "400kb-to-150",
        build(
            STAFF,
            STAFF2,
            "Minutes",
            "Minutes attached.",
            attachments=[("minutes.pdf", b"%PDF" + b"\0" * 400_000, "application/pdf")],
        ),
        "accept",
        absent=("bulk_weight",),
        envelope={"rcpt_to": tuple(f"staff{i}@redborne.example" for i in range(150))},
    ),
    Case(
        "one-huge-attachment",
        build(
            STAFF,
            OUTSIDER,
            "Video",
            "Video attached.",
            attachments=[("video.mp4", b"\0" * 16_000_000, "video/mp4")],
        ),
        "reject",
        (("bulk_weight", "1.2"),),
    ),
    Case(
        "inbound-bulk-tagged",
        inbound(
            "Brochure attached.",
            attachments=[("brochure.pdf", b"%PDF" + b"\0" * 2_000_000, "application/pdf")],
        ),
        "tag",
        (("bulk_weight", "1.2"),),
        envelope={**INBOUND, "rcpt_to": tuple(f"s{i}@redborne.example" for i in range(60))},
    ),
    # --- shouting ---------------------------------------------------------------------------
    Case(
        "caps-subject",
        build(STAFF, STAFF2, "WHO LEFT THE SCIENCE LAB UNLOCKED", "Please check."),
        "tag",
        (("shouting", "appendix"),),
    ),
    Case(
        "caps-body",
        build(
            STAFF,
            STAFF2,
            "Projector",
            "I NEED THE PROJECTOR BACK IN ROOM 14 BEFORE PERIOD THREE TODAY OR THE LESSON CANNOT GO AHEAD",
        ),
        "tag",
        (("shouting", "appendix"),),
    ),
    Case(
        "caps-inbound-not-tagged",
        inbound(
            "THIS MESSAGE IS CONFIDENTIAL AND INTENDED ONLY FOR THE NAMED "
            "RECIPIENT AND MAY CONTAIN PRIVILEGED INFORMATION"
        ),
        "accept",
        envelope=INBOUND,
    ),
    # --- safeguarding -----------------------------------------------------------------------
    Case(
        "self-harm",
        build(STUDENT, STAFF, "help", "i really want to die, nobody would miss me"),
        "accept",
        (("safeguarding_concern", "KCSIE"),),
        alerts=("dsl",),
    ),
    Case(
        "self-harm-with-swearing-not-bounced",
        build(STUDENT, STAFF, "help", "i want to die, this fucking school"),
        "quarantine",
        (("safeguarding_concern", "KCSIE"), ("obscene_language", "5.5")),
        alerts=("dsl",),
    ),
    Case(
        "bullying-held",
        build(STUDENT, STUDENT2, "you", "everyone hates you, nobody likes you"),
        "quarantine",
        (("safeguarding_concern", "6.15"),),
        alerts=("dsl",),
    ),
    Case(
        "bullying-with-threat-held-not-bounced",
        build(STUDENT, STUDENT2, "you", "kill yourself, you are worthless"),
        "quarantine",
        (("safeguarding_concern", "6.15"), ("obscene_language", "5.5")),
        alerts=("dsl", "slt"),
    ),
    Case(
        "grooming-inbound",
        build(OUTSIDER, STUDENT, "hi", "this can be our little secret, don't tell your parents ok"),
        "quarantine",
        (("safeguarding_concern", "KCSIE"),),
        envelope=INBOUND,
        alerts=("dsl",),
    ),
    Case(
        "grooming-photo",
        build(OUTSIDER, STUDENT, "hi", "are you home alone? send me a picture of yourself"),
        "quarantine",
        (("safeguarding_concern", "KCSIE"),),
        envelope=INBOUND,
    ),
    # --- links ------------------------------------------------------------------------------
    Case(
        "adult-link-outbound",
        out("Look at https://porn.example/video"),
        "reject",
        (("offensive_links", "5.5"),),
        alerts=("it",),
    ),
    Case(
        "adult-link-subdomain-html",
        out("see", html='<a href="http://cdn.porn.example/x">holiday photos</a>'),
        "reject",
        (("offensive_links", "5.5"),),
    ),
    Case(
        "adult-link-inbound",
        inbound("free videos at https://porn.example/"),
        "quarantine",
        (("offensive_links", "5.5"),),
        envelope=INBOUND,
    ),
    Case(
        "deceptive-link-inbound",
        inbound("login", html='<a href="http://evil.example/login">www.paypal.com</a>'),
        "tag",
        (("offensive_links", "5.5"),),
        envelope=INBOUND,
    ),
    # --- advertising --------------------------------------------------------------------------
    Case(
        "advert-outbound",
        build(
            STAFF,
            [f"c{i}@gmail.example" for i in range(30)],
            "Offer",
            "Buy now! Limited time offer, 20% off with discount code SAVE20 and free shipping. Shop now.",
        ),
        "reject",
        (("advertising", "5.5"),),
    ),
    Case(
        "advert-inbound-not-ours",
        inbound("Buy now! Limited time offer, discount code, free shipping."),
        "accept",
        envelope=INBOUND,
        absent=("advertising",),
    ),
    # --- hidden text and malformed mail ------------------------------------------------------
    Case(
        "hidden-text-inbound",
        inbound("hi", html='<p>Hello</p><p style="font-size:0">' + "lorem ipsum " * 10 + "</p>"),
        "tag",
        (("hidden_text", "5.5"),),
        envelope=INBOUND,
    ),
    Case(
        "malformed-mime",
        b"From: x@elsewhere.example\r\nTo: j.hughes@redborne.example\r\nSubject: broken\r\n"
        b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n'
        b"--zz\r\nContent-Type: text/plain\r\n\r\nhello\r\n",
        "accept",
        (("malformed_mime", "2.2"),),
        envelope=INBOUND,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_policy_case(case: Case, rules: Rules) -> None:
    verdict = scan(case.raw, Envelope(**case.envelope), rules).verdict  # type: ignore[arg-type]
    seen = {(f.detector, f.clause) for f in verdict.findings}
    detail = [f"{f.detector}/{f.category}/{f.severity}/{f.clause}" for f in verdict.findings]
    assert verdict.action.value == case.action, detail
    for expected in case.expect:
        assert expected in seen, detail
    for detector in case.absent:
        assert not [f for f in verdict.findings if f.detector == detector], detail
    for role in case.alerts:
        assert role in verdict.alerts


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 60
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
