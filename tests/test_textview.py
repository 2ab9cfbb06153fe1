"""What html_view shows a detector: the reader's text, the hidden text, and the links."""

from __future__ import annotations

import random
import time

import pytest

from milter import textview
from milter.textview import HtmlView, Link, html_view


def visible(html: str) -> str:
    return html_view(html).visible


# --- joining and separating ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("s<b></b>hit", "shit"),
        ("f<span>u</span>ck", "fuck"),
        ("<i>b</i><b>i</b><u>t</u><em>c</em><font>h</font>", "bitch"),
        ("s<!-- a comment -->hit", "shit"),
        ("s<span hidden>x</span>hit", "shit"),
    ],
)
def test_inline_elements_join_without_a_separator(html: str, expected: str) -> None:
    assert visible(html) == expected


def test_display_none_block_between_halves_of_a_word_leaves_the_word_joined() -> None:
    # A hidden <div> has no box in a browser, so it breaks nothing.
    view = html_view("s<div style='display:none'>zz</div>hit")
    assert view.visible == "shit"
    assert view.hidden == "zz"


def test_divs_made_inline_by_css_join() -> None:
    assert visible("<div style='display:inline'>s</div><div style='display:inline-block'>hit</div>") == "shit"


def test_paragraphs_become_separate_lines() -> None:
    assert visible("<p>a</p><p>b</p>") == "a\nb"


@pytest.mark.parametrize(
    "html",
    [
        "<div>one</div><div>two</div>",
        "<ul><li>one<li>two</ul>",
        "<h1>one</h1>two",
        "one<br>two",
        "<table><tr><td>one</td></tr><tr><td>two</td></tr></table>",
        "one<hr>two",
        "<span style='display:block'>one</span><span style='display:block'>two</span>",
    ],
)
def test_block_elements_separate_lines(html: str) -> None:
    assert visible(html).splitlines() == ["one", "two"]


def test_table_cells_are_separate_words_on_one_line() -> None:
    assert visible("<table><tr><td>a</td><td>b</td><th>c</th></tr></table>") == "a b c"


def test_whitespace_collapses_like_a_browser() -> None:
    assert visible("<p>  lots \n\t of   <b> space </b>  here </p>") == "lots of space here"


def test_at_most_one_blank_line_in_a_row() -> None:
    assert visible("a<br><br><br><br><br>b") == "a\n\nb"
    assert visible("<pre>a\n\n\n\n\nb</pre>") == "a\n\nb"


def test_pre_keeps_newlines_and_spaces() -> None:
    view = html_view("<p>intro</p><pre>\nline 1\n    indented  twice\nline 3</pre><p>outro</p>")
    assert view.visible == "intro\nline 1\n    indented  twice\nline 3\noutro"


def test_image_alt_text_is_visible() -> None:
    assert visible("Click <img src='x.png' alt='FREE MONEY'> now") == "Click FREE MONEY now"


def test_entities_are_decoded() -> None:
    assert visible("<p>Fish &amp; chips &lt;today&gt; caf&eacute; &#8364;5 &#x263A;</p>") == (
        "Fish & chips <today> café €5 ☺"
    )


def test_nbsp_counts_as_space() -> None:
    assert visible("a&nbsp;&nbsp;&nbsp;b") == "a b"


def test_upper_case_markup_works() -> None:
    view = html_view("<P>shown</P><DIV STYLE='DISPLAY:NONE'>gone</DIV>")
    assert (view.visible, view.hidden) == ("shown", "gone")


# --- things that are not body text ---------------------------------------------------------


def test_script_style_and_head_are_dropped() -> None:
    view = html_view(
        "<html><head><title>TITLE</title><meta name='x' content='META'><style>p{color:red}</style>"
        "<script>var SCRIPT = 1;</script></head><body>body text<script>alert('SCRIPT2')</script>"
        "<style>.STYLE2{}</style><noscript>NOSCRIPT</noscript><template><p>TEMPLATE</p></template>"
        "<!-- COMMENT --><?php echo 'PI'; ?></body></html>"
    )
    assert view.visible == "body text"
    assert view.hidden == ""


def test_text_after_closing_html_tag_is_kept() -> None:
    # libxml2 drops it, but browsers render it: a place to hide content from a naive scanner.
    assert visible("<html><body><p>fine</p></body></html>bad<p>words</p>") == "fine\nbad\nwords"


def test_control_characters_do_not_split_words() -> None:
    assert visible("f\x00u\x01c\x7fk") == "fuck"


# --- hidden text ---------------------------------------------------------------------------

HIDING = {
    "hidden attribute": "<div hidden>SECRET</div>",
    "display none": "<div style='display: none'>SECRET</div>",
    "display none important": "<span style='DISPLAY:none !important'>SECRET</span>",
    "visibility hidden": "<span style='visibility:hidden'>SECRET</span>",
    "visibility collapse": "<span style='visibility:collapse'>SECRET</span>",
    "font-size 0": "<span style='font-size:0'>SECRET</span>",
    "font-size 0px": "<span style='font-size:0px'>SECRET</span>",
    "font-size 0pt": "<span style='font-size:0pt'>SECRET</span>",
    "font-size 0em": "<span style='font-size:0em'>SECRET</span>",
    "font-size 0%": "<span style='font-size:0%'>SECRET</span>",
    "font shorthand 0/0": "<span style='font:0/0 a'>SECRET</span>",
    "sub-pixel font": "<span style='font-size:0.4px'>SECRET</span>",
    "opacity 0": "<span style='opacity:0'>SECRET</span>",
    "max-height 0 overflow hidden": "<div style='max-height:0;overflow:hidden'>SECRET</div>",
    "height 0 overflow hidden": "<div style='height:0px; overflow: hidden'>SECRET</div>",
    "color #fff": "<span style='color:#fff'>SECRET</span>",
    "color white": "<span style='color:white'>SECRET</span>",
    "color rgb white": "<span style='color:rgb(255, 255, 255)'>SECRET</span>",
    "color near white": "<span style='color:#fbfaf9'>SECRET</span>",
    "color transparent": "<span style='color:transparent'>SECRET</span>",
    "font color white": "<font color='#FFFFFF'>SECRET</font>",
    "same colour as styled background": "<div style='background:#336699'><b style='color:#369'>SECRET</b>",
    "inherited from a hidden ancestor": "<div style='display:none'><p><b>SECRET</b></p></div>",
}


@pytest.mark.parametrize("html", HIDING.values(), ids=HIDING.keys())
def test_hidden_text_goes_to_hidden_not_visible(html: str) -> None:
    view = html_view(f"<p>before</p>{html}<p>after</p>")
    assert "SECRET" in view.hidden
    assert "SECRET" not in view.visible
    assert view.visible == "before\nafter"


NOT_HIDING = {
    "height 0 without overflow hidden": "<div style='height:0'>SHOWN</div>",
    "light grey is readable": "<span style='color:#eeeeee'>SHOWN</span>",
    "white on a dark cell": "<table><tr><td bgcolor='#000000'><font color='white'>SHOWN</font></td></tr>",
    "white on a background image": "<td style='background:url(a.jpg)'><i style='color:#fff'>SHOWN</i>",
    "white on a background attribute": "<table><tr><td background='hero.jpg'><font color='#fff'>SHOWN</font>",
    "small but readable font": "<span style='font-size:9px'>SHOWN</span>",
    "relative font size": "<span style='font-size:0.8em'>SHOWN</span>",
    "dark mode body": "<body bgcolor='black' text='white'>SHOWN</body>",
    "link in white container": "<div style='color:#fff'><a href='x'>SHOWN</a></div>",
    "font size restored": "<div style='font-size:0'><span style='font-size:14px'>SHOWN</span></div>",
    "visibility restored": "<div style='visibility:hidden'><i style='visibility:visible'>SHOWN</i></div>",
    "opacity 1": "<span style='opacity:1'>SHOWN</span>",
    "aria-hidden": "<span aria-hidden='true'>SHOWN</span>",
}


@pytest.mark.parametrize("html", NOT_HIDING.values(), ids=NOT_HIDING.keys())
def test_readable_text_stays_visible(html: str) -> None:
    view = html_view(html)
    assert "SHOWN" in view.visible
    assert "SHOWN" not in view.hidden


def test_white_on_white_via_bgcolor_on_a_table_cell() -> None:
    view = html_view(
        "<table bgcolor='#000000'><tr>"
        "<td><font color='#ffffff'>on black</font></td>"
        "<td bgcolor='#ffffff'><font color='#ffffff'>buy pills</font></td>"
        "</tr></table>"
    )
    assert view.visible == "on black"
    assert view.hidden == "buy pills"


def test_bgcolor_without_hash_is_understood() -> None:
    view = html_view(
        "<table><tr><td bgcolor='000000'><span style='color:#000'>dark on dark</span></td></tr></table>"
    )
    assert view.hidden == "dark on dark"


def test_hidden_fragments_separated_by_visible_text_do_not_join() -> None:
    view = html_view("<p>a <span hidden>pe</span> b <span hidden>nis</span></p>")
    assert view.visible == "a b"
    assert view.hidden == "pe nis"


def test_style_sheet_class_id_and_tag_rules_hide() -> None:
    view = html_view(
        "<style>.gone, .other { display: none } #ghost{visibility:hidden} p.tiny{font-size:0}"
        " blink{display:none}</style>"
        "<p>shown</p><div class='x gone'>C1</div><span id='ghost'>C2</span><p class='tiny'>C3</p>"
        "<span class='tiny'>not a p</span><blink>C4</blink>"
    )
    assert view.visible == "shown\nnot a p"
    assert view.hidden.split() == ["C1", "C2", "C3", "C4"]


def test_style_sheet_rules_in_media_queries_and_complex_selectors_do_not_hide() -> None:
    view = html_view(
        "<style>@media (max-width:480px){.mobile-hide{display:none}} div .nested{display:none}"
        " .hover:hover{display:none}</style>"
        "<div class='mobile-hide'>A</div><div><span class='nested'>B</span></div><p class='hover'>C</p>"
    )
    assert view.visible.split() == ["A", "B", "C"]
    assert view.hidden == ""


def test_style_sheet_background_makes_white_button_text_readable() -> None:
    view = html_view(
        "<style>.btn{background:#e4002b}</style>"
        "<table><tr><td class='btn'><a href='https://s.example/book' style='color:#ffffff'>Book now</a>"
        "</td></tr></table>"
    )
    assert view.visible == "Book now"
    assert view.links == (Link("https://s.example/book", "Book now"),)


# --- links ---------------------------------------------------------------------------------


def test_link_text_and_href_are_reported_even_when_they_disagree() -> None:
    view = html_view(
        "<p>Log in at <a href='  http://evil.example/login  '>https://<b>bank</b>.example</a> today</p>"
    )
    assert view.links == (Link(href="http://evil.example/login", text="https://bank.example"),)
    assert view.visible == "Log in at https://bank.example today"


def test_links_in_document_order_including_area_and_image_links() -> None:
    view = html_view(
        "<a href='/one'>one</a><a name='anchor'>no href</a>"
        "<map><area href='/two' alt='two'></map>"
        "<a href='/three'><img src='x' alt='three'></a>"
    )
    assert [link.href for link in view.links] == ["/one", "/two", "/three"]
    assert [link.text for link in view.links] == ["one", "", "three"]


def test_link_text_leaves_out_hidden_text() -> None:
    view = html_view("<a href='https://x.example'>clean<span style='display:none'>dirty</span></a>")
    assert view.links == (Link("https://x.example", "clean"),)
    assert view.hidden == "dirty"


def test_link_entities_are_decoded_in_href() -> None:
    assert html_view("<a href='/a?x=1&amp;y=2'>t</a>").links[0].href == "/a?x=1&y=2"


# --- hostile and broken input ------------------------------------------------------------------

random.seed(20240601)
JUNK = bytes(random.randrange(256) for _ in range(50_000)).decode("latin-1")

HOSTILE = {
    "empty": "",
    "whitespace": " \n\t ",
    "junk bytes as latin-1": JUNK,
    "NULs": "\x00" * 100 + "<p>\x00\x00</p>\x00",
    "only a comment": "<!-- nothing here -->",
    "unclosed comment": "<p>a</p><!-- never closed",
    "xml declaration with encoding": "<?xml version='1.0' encoding='ISO-8859-1'?><html><body>x</body></html>",
    "unclosed tags": "<div><table><tr><td><b><i>text",
    "lone surrogate": "a\udcff\ud800b",
    "doctype only": "<!DOCTYPE html>",
    "angle brackets": "<<<>>></></ <a <b =\"'",
    "broken styles": "<p style='color:; font-size:calc(; background: url(' hidden=>x</p><style>}{@a{</style>",
}


@pytest.mark.parametrize("html", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_never_raises(html: str) -> None:
    view = html_view(html)
    assert isinstance(view, HtmlView)
    assert isinstance(view.visible, str) and isinstance(view.hidden, str)
    assert "\x00" not in view.visible + view.hidden


def test_empty_and_comment_only_documents_are_empty() -> None:
    assert html_view("") == HtmlView("", "", ())
    assert html_view("<!-- x -->") == HtmlView("", "", ())


def test_xml_declaration_with_encoding_is_not_used_to_redecode() -> None:
    assert visible("<?xml version='1.0' encoding='ISO-8859-1'?><p>café €</p>") == "café €"
    assert visible("<meta charset='windows-1252'><p>café €</p>") == "café €"


def test_junk_bytes_keep_their_printable_text() -> None:
    assert "hello" in visible(JUNK[:1000] + " hello ")


def test_deep_nesting_keeps_the_text_after_it() -> None:
    # libxml2 stops parsing at depth 2048; the text after must not vanish.
    html = "<p>before</p>" + "<div>" * 5000 + "deep" + "</div>" * 5000 + "<p>after <a href='/x'>link</a></p>"
    view = html_view(html)
    assert view.visible == "before\ndeep\nafter link"
    assert view.links == (Link("/x", "link"),)


def test_deep_nesting_inside_a_hidden_element_stays_hidden() -> None:
    view = html_view(
        "<div style='display:none'>" + "<span>" * 5000 + "secret" + "</span>" * 5000 + "</div>ok"
    )
    assert view.visible == "ok"
    assert view.hidden == "secret"


def test_a_megabyte_of_unclosed_divs() -> None:
    view = html_view("<div>" * 200_000 + "bottom")
    assert view.visible == "bottom"


def test_falls_back_to_crude_text_if_rendering_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(root: object) -> HtmlView:
        raise RuntimeError("boom")

    monkeypatch.setattr(textview, "_render", broken)
    view = html_view("<style>x{}</style><p>one &amp; two</p><p>three</p><a href='/l'>l</a>")
    assert view.visible == "one & two\nthree\nl"
    assert view.links == (Link("/l", ""),)


# --- a realistic newsletter, and speed ---------------------------------------------------------


def newsletter(size: int) -> str:
    """A marketing-style HTML newsletter: nested tables, repeated inline styles, a style sheet."""
    head = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Weekly news</title><style>"
        "body{margin:0} .preheader{display:none;max-height:0;overflow:hidden}"
        " .btn{background:#e4002b} td.spacer{font-size:0;line-height:0}"
        " @media only screen and (max-width:480px){.mobile-hide{display:none}}</style></head>"
        "<body bgcolor='#f4f4f4' style='margin:0'>"
        "<div class='preheader'>This week: trips and the summer fair</div>"
        "<table width='100%' cellpadding='0' cellspacing='0' border='0'><tr><td align='center'>"
        "<table width='600' cellpadding='0' cellspacing='0' style='background-color:#ffffff'>"
    )
    item = (
        "<tr><td class='spacer' height='20'>&nbsp;</td></tr>"
        "<tr><td style='padding:10px 20px;font-family:Arial,sans-serif;font-size:16px;color:#333333'>"
        "<h2 style='margin:0;font-size:20px;color:#1a1a1a'>Story {i}</h2>"
        "<p style='margin:8px 0;line-height:1.4'>Year {i} visited the museum &amp; the "
        "<b>science</b> centre. Read more on the "
        "<a href='https://school.example/news/{i}' style='color:#0066cc'>news page</a>.</p>"
        "<table cellpadding='0' cellspacing='0'><tr><td class='btn' style='border-radius:4px;padding:8px'>"
        "<a href='https://school.example/book/{i}' style='color:#ffffff;text-decoration:none'>Book now</a>"
        "</td><td><img src='https://school.example/i/{i}.png' alt='Photo {i}' width='60'></td></tr></table>"
        "</td></tr>"
    )
    tail = (
        "<tr><td style='font-size:12px;color:#999999;padding:20px'>You receive this as a parent."
        " <a href='https://school.example/unsubscribe'>Unsubscribe</a></td></tr>"
        "</table></td></tr></table></body></html>"
    )
    parts = [head]
    i = 0
    while sum(map(len, parts)) + len(tail) < size:
        i += 1
        parts.append(item.format(i=i))
    parts.append(tail)
    return "".join(parts)


def test_newsletter_reads_as_a_reader_sees_it() -> None:
    view = html_view(newsletter(5_000))
    lines = view.visible.splitlines()
    assert lines[:3] == [
        "Story 1",
        "Year 1 visited the museum & the science centre. Read more on the news page.",
        "Book now Photo 1",
    ]
    assert lines[-1] == "You receive this as a parent. Unsubscribe"
    assert view.hidden == "This week: trips and the summer fair"
    assert view.links[:2] == (
        Link("https://school.example/news/1", "news page"),
        Link("https://school.example/book/1", "Book now"),
    )
    assert view.links[-1] == Link("https://school.example/unsubscribe", "Unsubscribe")


def test_a_20kb_newsletter_renders_quickly() -> None:
    html = newsletter(20_000)
    assert len(html) >= 20_000
    html_view(html)  # warm the style caches, as a running gateway would have
    best = min(_timed(html) for _ in range(5))
    # About 1.3 ms on a developer machine; the bound is loose so a busy CI runner does not flake.
    assert best < 0.020


def _timed(html: str) -> float:
    start = time.perf_counter()
    html_view(html)
    return time.perf_counter() - start
