"""The technicians' web console in a real headless Chromium (Debian's, driven by Playwright).

Sign in, find a held message, open it with a reason, release it to the sink, delete
another, find both in the audit log; a DSL sees only safeguarding; a personal-marked body
stays shut without recorded authority; a hostile message renders inert; screenshots of
the main pages at desktop and phone sizes.
"""

from __future__ import annotations

import csv
import io
import os
import re
from email import message_from_bytes
from typing import Any

import pytest

from tests.browser.conftest import (
    CHROMIUM,
    DESKTOP,
    HOSTILE,
    HOSTILE_FILENAME,
    HOSTILE_SUBJECT,
    MALWARE,
    OBSCENE,
    OBSCENE_2,
    PERSONAL,
    PHONE,
    SAFEGUARDING,
    Browser,
    Console,
    login,
    screenshot_dir,
    status_text,
)

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        f"{CHROMIUM} is not installed (apt-get install chromium, or `make test`); "
        "set CI=1 to make this a failure",
        allow_module_level=True,
    )

from playwright.sync_api import expect

# Everything in a document that could run code, as a list of descriptions.
ACTIVE_CONTENT = """() => {
    const found = [];
    for (const el of document.querySelectorAll("*")) {
        const tag = el.tagName.toLowerCase();
        if (tag === "script" && !(el.getAttribute("src") || "").startsWith("/static/")) {
            found.push("script: " + el.outerHTML.slice(0, 120));
        }
        if (["iframe", "frame", "object", "embed"].includes(tag) && !el.classList.contains("mailframe")) {
            found.push(tag + ": " + el.outerHTML.slice(0, 120));
        }
        if (tag === "meta" && (el.getAttribute("http-equiv") || "").toLowerCase() === "refresh") {
            found.push("meta refresh: " + el.outerHTML.slice(0, 120));
        }
        for (const attr of el.attributes) {
            const name = attr.name.toLowerCase();
            const value = attr.value.replace(/[\\s\\u0000-\\u001f]/g, "").toLowerCase();
            if (name.startsWith("on")) {
                found.push(tag + " " + name + "=" + attr.value.slice(0, 80));
            }
            if (value.includes("javascript:") || value.includes("vbscript:")) {
                found.push(tag + " " + name + "=" + attr.value.slice(0, 80));
            }
        }
    }
    return found;
}"""
REASON = "Checking a report from the head of PE (ticket 4471)"


def form_with(page: Any, button: str) -> Any:
    """The form whose submit button is called `button`."""
    return page.locator("form").filter(has=page.get_by_role("button", name=button, exact=True)).first


def act(page: Any, button: str, reason: str = REASON, **fields: str) -> None:
    """Fill the form of `button` (its reason and any named fields) and submit it."""
    form = form_with(page, button)
    expect(form).to_be_attached()
    reason_field = form.locator("[name=reason]")
    if reason_field.count():
        reason_field.fill(reason)
    for name, value in fields.items():
        form.locator(f"[name={name}]").fill(value)
    form.get_by_role("button", name=button, exact=True).click()
    page.wait_for_load_state()


def open_message(page: Any, message_id: str, reason: str = REASON) -> None:
    page.goto(f"/quarantine/{message_id}")
    act(page, "Open message", reason)


def post_form(page: Any, action: str, **fields: str) -> Any:
    """Submit a form the page does not offer, as a user editing the page could: a real browser
    POST with the session's CSRF token (taken from the Sign out form) and the page's origin."""
    token = page.locator("form[action='/logout'] input[name=csrf_token]").get_attribute("value")
    with page.expect_navigation() as navigation:
        page.evaluate(
            """([action, fields]) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                for (const [name, value] of Object.entries(fields)) {
                    const input = document.createElement("input");
                    input.type = "hidden";
                    input.name = name;
                    input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            [action, {"csrf_token": token, **fields}],
        )
    return navigation.value


def list_ids(page: Any) -> list[str]:
    return [row.get_attribute("data-id") for row in page.locator("tr[data-id]").all()]


# ------------------------------------------------------------------- sign in


def test_sign_in_is_required_and_sign_out_ends_the_session(web: Browser) -> None:
    page, _ = web.page()
    page.goto("/quarantine")
    expect(page).to_have_url(re.compile(r"/login"))
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()

    page.get_by_label("Username").fill("tech")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong username or password")
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)

    login(page, "tech")
    page.goto("/quarantine")
    expect(page.locator(f'tr[data-id="{OBSCENE}"]')).to_be_visible()

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    page.goto("/quarantine")
    expect(page).to_have_url(re.compile(r"/login"))


# ---------------------------------------------------- the technician's round


def test_find_open_release_delete_and_audit(web: Browser, console: Console) -> None:
    page, watch = web.page()
    login(page, "tech")

    # Find it: the search box narrows the list to the parent's message.
    page.goto("/quarantine")
    page.get_by_role("searchbox", name="Search").fill("Friday")
    page.get_by_role("searchbox", name="Search").press("Enter")
    page.wait_for_load_state()
    expect(page.locator(f'tr[data-id="{OBSCENE}"]')).to_be_visible()
    assert list_ids(page) == [OBSCENE]

    # The page of the message shows the findings, not the body.
    page.get_by_role("link", name=OBSCENE, exact=True).click()
    expect(page).to_have_url(re.compile(f"/quarantine/{OBSCENE}$"))
    expect(page.get_by_text("About Friday's match").first).to_be_visible()
    assert "left on the bench" not in page.content()

    # Open it with a reason: a sanitised text view and a sandboxed HTML view.
    act(page, "Open message", REASON)
    expect(page.get_by_text("left on the bench").first).to_be_visible()
    frame = page.locator("iframe[sandbox]")
    expect(frame).to_have_count(1)
    assert "allow-scripts" not in (frame.get_attribute("sandbox") or "")
    assert f"/quarantine/{OBSCENE}/html" in (frame.get_attribute("src") or "")
    expect(page.frame_locator("iframe[sandbox]").get_by_text("left on the bench")).to_be_visible()

    # Release it: it arrives at the sink, as it was received.
    page.goto(f"/quarantine/{OBSCENE}")
    act(page, "Release", "Not offensive in context: a parent's complaint for the head of PE")
    [delivered] = console.sink.wait_for(1, timeout=15)
    assert delivered.rcpt_tos == ("j.hughes@redborne.example",)
    assert message_from_bytes(delivered.data)["Subject"] == "About Friday's match"
    assert re.search(r"released", status_text(page), re.I)
    assert console.store.get(OBSCENE).status == "released"

    # Delete another one.
    page.goto("/quarantine")
    page.get_by_role("link", name=OBSCENE_2, exact=True).click()
    act(page, "Delete", "Student banter, spoken to by the head of year")
    assert re.search(r"deleted", status_text(page), re.I)
    record = console.store.get(OBSCENE_2)
    assert record.status == "deleted" and not record.has_body

    # Both in the audit log, with who, what and why.
    page.goto("/audit")
    audit = page.locator("main").inner_text()
    assert OBSCENE in audit and OBSCENE_2 in audit
    assert "Not offensive in context" in audit and "Student banter" in audit
    assert REASON in audit  # the look at the body
    for target, action in ((OBSCENE, "release"), (OBSCENE_2, "delete"), (OBSCENE, "view_body")):
        entries = console.store.audit_entries(target=target, action=action)
        assert entries and entries[0].actor == "tech", (target, action)

    # The CSV export has them too.
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    rows = list(csv.reader(io.StringIO(download.value.path().read_text(encoding="utf-8-sig"))))
    flat = [" ".join(row) for row in rows[1:]]
    assert any(OBSCENE in row and "release" in row for row in flat), rows
    assert any(OBSCENE_2 in row and "delete" in row for row in flat), rows
    assert not watch.dialogs


def test_audit_log_filters(web: Browser, console: Console) -> None:
    tech, _ = web.page()
    login(tech, "tech")
    tech.goto(f"/quarantine/{MALWARE}")
    act(tech, "Delete", "Virus, nothing to keep")
    open_message(tech, OBSCENE, REASON)

    auditor, _ = web.page()
    login(auditor, "auditor")
    expect(auditor.get_by_role("link", name="Quarantine")).to_have_count(0)
    auditor.goto("/audit")
    auditor.get_by_label(re.compile("target", re.I)).fill(MALWARE)
    auditor.get_by_label(re.compile("target", re.I)).press("Enter")
    auditor.wait_for_load_state()
    text = auditor.locator("main").inner_text()
    assert MALWARE in text and "Virus, nothing to keep" in text
    assert OBSCENE not in text and REASON not in text
    # The auditor reads the log but never a message.
    response = auditor.goto(f"/quarantine/{MALWARE}")
    assert response is not None and response.status == 403


# ----------------------------------------------------------------------- roles


def test_dsl_sees_only_safeguarding(web: Browser, console: Console) -> None:
    page, _ = web.page()
    login(page, "dsl")
    page.goto("/quarantine")
    expect(page.locator(f'tr[data-id="{SAFEGUARDING}"]')).to_be_visible()
    assert list_ids(page) == [SAFEGUARDING]
    content = page.content()
    for hidden in (OBSCENE, OBSCENE_2, MALWARE, PERSONAL, HOSTILE, "About Friday", "Overdue invoice"):
        assert hidden not in content, hidden

    # Not by a filter, a search or a typed URL either.
    page.goto("/quarantine?category=obscene_language")
    assert list_ids(page) == []
    page.goto(f"/quarantine?q={OBSCENE}")
    assert list_ids(page) == []
    response = page.goto(f"/quarantine/{OBSCENE}")
    assert response is not None and response.status in (403, 404)
    assert "About Friday" not in page.content()
    page.goto("/quarantine")
    response = post_form(page, f"/quarantine/{OBSCENE}/open", reason="curious")
    assert response is not None and response.status == 404
    assert "left on the bench" not in page.content()
    response = page.goto(f"/quarantine/{OBSCENE}/html")
    assert response is not None and response.status in (403, 404)
    assert not console.store.audit_entries(target=OBSCENE, action="view_body")

    # Her own category she can open.
    open_message(page, SAFEGUARDING, "Safeguarding review of the 8B report")
    expect(page.get_by_text("Nobody wants you here").first).to_be_visible()

    # No dashboard or lists (counts and senders of every category), and her own audit entries only.
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/quarantine$"))
    for link in ("Dashboard", "Lists"):
        expect(page.get_by_role("link", name=link, exact=True)).to_have_count(0)
    response = page.goto("/lists")
    assert response is not None and response.status == 403
    assert "nuisance@example.net" not in page.content()
    page.goto("/audit")
    audit = page.locator("main").inner_text()
    assert SAFEGUARDING in audit and "Safeguarding review of the 8B report" in audit
    assert "nuisance@example.net" not in audit and "spammy-newsletters" not in audit
    response = page.request.get("/audit.csv?actor=tech")
    assert response.ok
    assert "nuisance@example.net" not in response.text() and SAFEGUARDING in response.text()


def test_personal_body_needs_recorded_authority(web: Browser, console: Console) -> None:
    tech, _ = web.page()
    login(tech, "tech")
    tech.goto("/quarantine")
    # The list does not give the subject away either.
    expect(tech.locator(f'tr[data-id="{PERSONAL}"]')).to_contain_text("marked personal")
    expect(tech.locator(f'tr[data-id="{PERSONAL}"]')).not_to_contain_text("Meeting on Thursday")
    tech.goto(f"/quarantine/{PERSONAL}")
    expect(tech.locator("main")).to_contain_text("marked personal")
    expect(tech.get_by_role("button", name="Open message")).to_have_count(0)
    expect(tech.get_by_role("link", name=re.compile("Inspect attachment"))).to_have_count(0)

    # Posting the open form anyway is refused, and the refusal is audited.
    response = post_form(tech, f"/quarantine/{PERSONAL}/open", reason="Checking why it was held")
    assert response is not None and response.status == 403
    assert re.search(r"authority", status_text(tech), re.I)
    assert "PERSONAL-BODY-MARKER" not in tech.content()
    expect(tech.locator("iframe")).to_have_count(0)
    assert console.store.audit_entries(target=PERSONAL, action="view_refused")
    assert not console.store.audit_entries(target=PERSONAL, action="view_body")
    # The HTML view and the attachments are shut too, whatever the URL.
    for path in (f"/quarantine/{PERSONAL}/html", f"/quarantine/{PERSONAL}/attachments/1"):
        response = tech.goto(path)
        assert response is not None and response.status in (403, 404), path
        assert "PERSONAL-BODY-MARKER" not in tech.content()

    # A technician cannot record authority for themself.
    tech.goto(f"/quarantine/{PERSONAL}")
    expect(tech.get_by_role("button", name="Record authority")).to_have_count(0)

    # SLT records it (clause 2.7) ...
    slt, _ = web.page()
    login(slt, "slt")
    slt.goto(f"/quarantine/{PERSONAL}")
    act(slt, "Record authority", "Grievance investigation authorised by the Principal")
    assert re.search(r"authority", status_text(slt), re.I)
    assert console.store.audit_entries(target=PERSONAL, action="grant_authority")

    # ... and now the technician can open it.
    open_message(tech, PERSONAL, "Grievance investigation authorised by the Principal")
    expect(tech.get_by_text("PERSONAL-BODY-MARKER").first).to_be_visible()
    assert console.store.audit_entries(target=PERSONAL, action="view_body")


# ------------------------------------------------------------------ lists


def test_false_positive_is_proposed_then_approved_on_lists(web: Browser, console: Console) -> None:
    page, _ = web.page()
    login(page, "tech")
    page.goto(f"/quarantine/{OBSCENE}")
    act(page, "Not offensive (false positive)", "A parent quoting what his son was called")
    assert re.search(r"proposed", status_text(page), re.I)

    page.goto("/lists")
    proposal = page.locator("tr[data-entry]").filter(has_text="angry.parent@example.org")
    expect(proposal).to_contain_text("allow")
    expect(proposal).to_contain_text("A parent quoting")
    proposal.get_by_role("button", name="Approve").click()
    page.wait_for_load_state()
    assert re.search(r"approved", status_text(page), re.I)

    page.locator("tr[data-entry]").filter(has_text="spammy-newsletters.example").get_by_role(
        "button", name="Refuse"
    ).click()
    page.wait_for_load_state()
    assert re.search(r"refused", status_text(page), re.I)

    status = {(e.list, e.value): (e.status, e.decided_by) for e in console.store.entries()}
    assert status[("allow", "angry.parent@example.org")] == ("approved", "tech")
    assert status[("block", "spammy-newsletters.example")] == ("refused", "tech")
    assert console.store.audit_entries(action="approve_allow", target="sender:angry.parent@example.org")
    assert console.store.audit_entries(action="refuse_block", target="domain:spammy-newsletters.example")


def test_release_to_other_recipients(web: Browser, console: Console) -> None:
    page, _ = web.page()
    login(page, "tech")
    page.goto(f"/quarantine/{SAFEGUARDING}")
    page.get_by_text("Release to other recipients").click()
    act(
        page,
        "Release to…",
        "Evidence for the head of year, at the DSL's request",
        recipients="head.of.year8@redborne.example",
    )
    [delivered] = console.sink.wait_for(1, timeout=15)
    assert delivered.rcpt_tos == ("head.of.year8@redborne.example",)
    assert b"Nobody wants you here" in delivered.data
    assert re.search(r"released", status_text(page), re.I)
    [entry] = console.store.audit_entries(target=SAFEGUARDING, action="release")
    assert entry.details["recipients"] == ["head.of.year8@redborne.example"]


def test_block_sender_from_a_message(web: Browser, console: Console) -> None:
    page, _ = web.page()
    login(page, "tech")
    page.goto(f"/quarantine/{MALWARE}")
    act(page, "Block sender", "Sends malware")
    values = {(e.kind, e.value) for e in console.store.entries("block")}
    assert ("sender", "accounts@supplier.example.com") in values
    page.goto("/lists")
    expect(page.get_by_text("accounts@supplier.example.com").first).to_be_visible()


# ---------------------------------------------------------- hostile content


def assert_inert(page: Any) -> None:
    """Nothing executable in the page or its frames: no script but the console's own file,
    no event handler attribute, no javascript: URL, no meta refresh, no stray frame."""
    for document in page.frames:
        found = document.evaluate(ACTIVE_CONTENT)
        assert found == [], f"active content in {document.url}: {found}"


def test_hostile_message_renders_inert(web: Browser, console: Console) -> None:
    page, watch = web.page()
    login(page, "tech")

    page.goto("/quarantine")
    row = page.locator(f'tr[data-id="{HOSTILE}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text(HOSTILE_SUBJECT)  # shown as text, not run
    assert_inert(page)

    page.goto(f"/quarantine/{HOSTILE}")
    main = page.locator("main")
    expect(main).to_contain_text(HOSTILE_SUBJECT)
    expect(main).to_contain_text('"><img src=x onerror=alert(19)>@attacker.example')  # header From
    expect(main).to_contain_text("<img src=x onerror=alert(16)>")  # a finding's summary
    assert_inert(page)

    open_message(page, HOSTILE, "Checking a suspicious invoice")
    expect(main).to_contain_text("<script>alert(13)</script> plain text part")
    expect(main).to_contain_text("<script>alert(12)</script>")  # the From display name
    expect(main).to_contain_text("<svg onload=alert(15)>")  # Reply-To
    expect(main).to_contain_text("<script>alert(17)</script>")  # evidence, shown once opened
    frame = page.locator("iframe[sandbox]")
    expect(frame).to_have_count(1)
    sandbox = frame.get_attribute("sandbox") or ""
    assert "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    inner = page.frame_locator("iframe[sandbox]")
    expect(inner.get_by_text("Invoice attached.")).to_be_visible()
    page.wait_for_timeout(500)  # time for anything that would fire (onload, onerror, refresh)
    assert_inert(page)

    # The attachment's warning page shows the hostile file name as text.
    row = page.locator("tr").filter(has_text=HOSTILE_FILENAME)
    expect(row).to_have_count(1)
    row.get_by_role("link", name=re.compile("Inspect attachment")).click()
    page.wait_for_load_state()
    expect(page.locator("main")).to_contain_text(HOSTILE_FILENAME)
    page.wait_for_timeout(300)
    assert_inert(page)

    assert not watch.dialogs, f"a hostile script ran: {watch.dialogs}"
    assert not watch.own_csp_violations(), watch.own_csp_violations()


def test_attachment_download_is_confirmed_audited_and_safely_named(web: Browser, console: Console) -> None:
    page, watch = web.page()
    login(page, "tech")
    open_message(page, HOSTILE, "Checking a suspicious invoice")
    page.locator("tr").filter(has_text=HOSTILE_FILENAME).get_by_role(
        "link", name=re.compile("Inspect attachment")
    ).click()
    page.wait_for_load_state()
    expect(page.get_by_label(re.compile("reason", re.I))).to_have_value("Checking a suspicious invoice")
    page.get_by_label(re.compile("I understand the risk")).check()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download as-is").click()
    name = download.value.suggested_filename
    assert not re.search(r'[<>"/\\]', name), name
    assert download.value.path().read_bytes() == b"%PDF-1.4 not really\n"
    [entry] = [
        e for e in console.store.audit_entries(target=HOSTILE, action="view_body") if "download" in e.reason
    ]
    assert entry.actor == "tech"
    assert not watch.dialogs


def test_responses_carry_security_headers(web: Browser, console: Console) -> None:
    page, _ = web.page()
    login(page, "tech")
    response = page.goto(f"/quarantine/{HOSTILE}")
    assert response is not None
    headers = response.all_headers()
    csp = headers.get("content-security-policy", "")
    assert "script-src" in csp or "default-src" in csp, headers
    assert "unsafe-inline" not in re.sub(r"style-src[^;]*", "", csp), csp
    assert headers.get("x-content-type-options") == "nosniff"
    open_message(page, HOSTILE, "Checking a suspicious invoice")
    html_response = page.request.get(f"/quarantine/{HOSTILE}/html")
    html_csp = html_response.headers.get("content-security-policy", "")
    assert html_csp, html_response.headers
    assert "script-src 'none'" in html_csp or "default-src 'none'" in html_csp, html_csp


# --------------------------------------------------------------- accessibility


def test_every_form_control_has_a_label(web: Browser) -> None:
    page, _ = web.page()
    unlabelled: dict[str, list[str]] = {}

    def check(path: str) -> None:
        page.goto(path)
        missing = page.eval_on_selector_all(
            "input:not([type=hidden]):not([type=submit]):not([type=button]), select, textarea",
            """els => els.filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                                   && !e.getAttribute('aria-labelledby'))
                      .map(e => e.outerHTML)""",
        )
        if missing:
            unlabelled[path] = missing

    check("/login")
    login(page, "tech")
    for path in ("/", "/quarantine", f"/quarantine/{OBSCENE}", "/lists", "/audit"):
        check(path)
    assert not unlabelled, unlabelled


# ----------------------------------------------------------------- screenshots


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_screenshots_of_the_main_pages(web: Browser, size: str) -> None:
    viewport = DESKTOP if size == "desktop" else PHONE
    page, watch = web.page(viewport, phone=size == "phone")
    out = screenshot_dir()

    def shot(name: str) -> None:
        page.wait_for_load_state("networkidle")
        path = out / f"{name}-{size}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5_000, f"{path} is (nearly) empty"

    page.goto("/login")
    shot("login")
    login(page, "tech")
    page.goto("/")
    shot("dashboard")
    # A morning's work first, so the list and the log look like a console in use.
    page.goto(f"/quarantine/{MALWARE}")
    act(page, "Delete", "Malware: nothing to keep")
    page.goto(f"/quarantine/{OBSCENE_2}")
    act(page, "Block sender", "Student account abusing other schools' staff")
    page.goto("/quarantine")
    shot("quarantine")
    page.goto(f"/quarantine/{OBSCENE}")
    shot("message")
    act(page, "Open message", REASON)
    expect(page.frame_locator("iframe[sandbox]").get_by_text("left on the bench")).to_be_visible()
    # A full-page capture paints a sandboxed (out-of-process) frame only once it was in view.
    page.locator("iframe[sandbox]").scroll_into_view_if_needed()
    shot("message-opened")
    page.goto("/lists")
    shot("lists")
    page.goto("/audit")
    shot("audit")
    assert not watch.dialogs


# ---------------------------------------------------------------------- layout

# How far an element's content runs past its box, sideways (0 when it fits).
OVERFLOW_X = "el => el.scrollWidth - el.clientWidth"


def test_layout_fits_desktop_and_phone(web: Browser) -> None:
    desktop, _ = web.page(DESKTOP)
    login(desktop, "tech")
    # The audit log fits its card at 1280 px: no sideways scrolling, nothing cut off.
    desktop.goto("/audit")
    expect(desktop.locator("table.audit")).to_be_visible()
    assert desktop.locator("table.audit").locator("xpath=..").evaluate(OVERFLOW_X) <= 0
    assert desktop.locator("section.table-card").evaluate(OVERFLOW_X) <= 0
    # The filters start open on a wide screen.
    desktop.goto("/quarantine")
    expect(desktop.get_by_role("searchbox", name="Search")).to_be_visible()

    phone, _ = web.page(PHONE, phone=True)
    login(phone, "tech")
    for path in ("/", "/quarantine", f"/quarantine/{OBSCENE}", "/lists", "/audit"):
        phone.goto(path)
        # The nav fits the width: every link on screen, none scrolled away.
        assert phone.locator("nav.mainnav").evaluate(OVERFLOW_X) <= 0, path
        for link in phone.locator("nav.mainnav a").all():
            box = link.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], path
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], path
    # The quarantine's filters fold away on a phone, so the first message is on the first screen.
    phone.goto("/quarantine")
    expect(phone.get_by_role("searchbox", name="Search")).to_be_hidden()
    first = phone.locator("tr[data-id]").first.bounding_box()
    assert first and first["y"] < PHONE["height"] - 200, first
    phone.get_by_text("Search and filters").click()
    expect(phone.get_by_role("searchbox", name="Search")).to_be_visible()
    # ... and come open when a filter is set.
    phone.goto("/quarantine?status=held")
    expect(phone.get_by_role("combobox", name="Status")).to_be_visible()
