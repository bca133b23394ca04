import pytest

from speedup.time import Time, TimeConverter, Timestamp, TimeUnit, schedule_time


@pytest.mark.parametrize(
    "text, value, unit",
    [
        ("90ep", 90, TimeUnit.EPOCH),
        ("500ba", 500, TimeUnit.BATCH),
        ("0.3dur", 0.3, TimeUnit.DURATION),
        ("2e9tok", 2_000_000_000, TimeUnit.TOKEN),
        ("1024sp", 1024, TimeUnit.SAMPLE),
        ("12.5sec", 12.5, TimeUnit.SECOND),
        (" 3 ep ", 3, TimeUnit.EPOCH),
    ],
)
def test_parse(text, value, unit):
    t = Time.parse(text)
    assert t.value == value and t.unit == unit
    assert Time.parse(str(t)) == t


@pytest.mark.parametrize("bad", ["", "ep", "10", "10 epochs", "1.5ba", "-3ep", "abc", "1e3xx"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        Time.parse(bad)


def test_integer_units_are_ints():
    assert isinstance(Time.parse("2e3ba").value, int)


def test_arithmetic_and_comparison():
    assert Time.parse("3ep") + Time.parse("2ep") == Time(5, "ep")
    assert Time.parse("3ep") - Time.parse("1ep") == Time(2, "ep")
    assert Time.parse("10ba") * 2.5 == Time(25, "ba")
    assert Time.parse("1ep") < Time.parse("2ep")
    with pytest.raises(ValueError, match="one unit"):
        _ = Time.parse("1ep") + Time.parse("1ba")
    with pytest.raises(ValueError):
        _ = Time.parse("1ep") - Time.parse("2ep")


def test_conversion():
    conv = TimeConverter(
        batches_per_epoch=100,
        samples_per_batch=32,
        tokens_per_sample=128,
        max_duration=Time.parse("10ep"),
    )
    assert conv.convert("2ep", "ba") == Time(200, "ba")
    assert conv.convert("320sp", "ba") == Time(10, "ba")
    assert conv.convert("50ba", "ep") == Time(0.5, "ep")
    assert conv.convert("1ba", "tok") == Time(32 * 128, "tok")
    assert conv.convert("0.3dur", "ba") == Time(300, "ba")
    assert conv.convert("500ba", "dur") == Time(0.5, "dur")
    assert conv.to_batches("0.25dur") == 250.0
    with pytest.raises(ValueError, match="wall-clock"):
        conv.convert("10sec", "ba")


def test_tokens_need_sequence_data():
    conv = TimeConverter(batches_per_epoch=10, samples_per_batch=4)
    with pytest.raises(ValueError, match="tokens"):
        conv.convert("100tok", "ba")


def test_timestamp_counts():
    ts = Timestamp()
    for _ in range(3):
        ts.to_next_batch(samples=8, tokens=80)
    ts.to_next_epoch()
    ts.to_next_batch(samples=8)
    assert (ts.epoch, ts.batch, ts.sample, ts.token) == (1, 4, 32, 240)
    assert (ts.batch_in_epoch, ts.sample_in_epoch) == (1, 8)
    assert ts.get("ba") == 4 and ts.get(TimeUnit.EPOCH) == 1
    copy = Timestamp()
    copy.load_state_dict(ts.state_dict())
    assert copy == ts


def test_schedule_time_names_the_argument_and_refuses_wall_clock_and_zero_intervals():
    assert schedule_time("ema.ema_start", "0ba") == Time(0, TimeUnit.BATCH)
    assert schedule_time("swa.update_interval", "0.5dur", positive=True) == Time(
        0.5, TimeUnit.DURATION
    )
    with pytest.raises(ValueError, match=r"^ema.half_life: '10sec' is wall-clock"):
        schedule_time("ema.half_life", "10sec")
    with pytest.raises(ValueError, match=r"^swa.update_interval must be > 0, got '0ep'"):
        schedule_time("swa.update_interval", "0ep", positive=True)
    with pytest.raises(ValueError, match=r"^layer_freezing.freeze_start: duration '-1ba'"):
        schedule_time("layer_freezing.freeze_start", "-1ba")
    with pytest.raises(ValueError, match=r"^selective_backprop.end: malformed duration"):
        schedule_time("selective_backprop.end", "later")
