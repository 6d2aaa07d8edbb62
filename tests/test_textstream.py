from localai.engine.textstream import TextStreamer


def feed(stop, pieces):
    s = TextStreamer(stop)
    out = []
    for p in pieces:
        out.append(s.push(p))
        if s.stopped:
            break
    out.append(s.finish())
    return out, s


def test_deltas_join_to_text_without_stops():
    out, s = feed([], [b"Hel", b"lo", b" world"])
    assert "".join(out) == s.text == "Hello world"


def test_stop_string_split_over_tokens_is_never_shown():
    out, s = feed(["END"], [b"abc E", b"N", b"D tail"])
    assert s.stopped
    assert s.text == "abc "
    assert "".join(out) == "abc "
    assert all("E" not in o for o in out)


def test_false_prefix_is_released():
    out, s = feed(["END"], [b"abc EN", b"x"])
    assert not s.stopped
    assert out[0] == "abc "  # "EN" held back: it may grow into END
    assert "".join(out) == "abc ENx"


def test_utf8_split_over_tokens():
    snow = "é☃".encode()
    out, s = feed([], [snow[:1], snow[1:3], snow[3:]])
    assert out[0] == ""
    assert "".join(out) == s.text == "é☃"


def test_earliest_of_several_stops_wins():
    out, s = feed(["zz", "b"], [b"aab zz"])
    assert s.text == "aa" and "".join(out) == "aa"
