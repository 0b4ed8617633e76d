"""The AMQP 1.0 type codec: exact encodings, round trips, every truncation, malformed input,
and a property test plus a bounded fuzz of the decoder ("decode, or raise the protocol
error, never anything else")."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisiond.errors import AmqpProtocolError, InsufficientData, LocalProtocolError
from provisiond.protocol.amqp.types import (
    MAX_DEPTH,
    Array,
    Byte,
    Char,
    Decimal32,
    Decimal64,
    Decimal128,
    Described,
    Float,
    Int,
    Long,
    Short,
    Symbol,
    Timestamp,
    TypeCode,
    UByte,
    UInt,
    ULong,
    UShort,
    decode_value,
    encode_value,
    symbol_array,
)


def encode(value: Any) -> bytes:
    buffer = bytearray()
    encode_value(value, buffer)
    return bytes(buffer)


def decode_all(data: bytes) -> Any:
    rest, value = decode_value(data)
    assert not rest
    return value


# --- exact encodings (Part 1 §1.6) -------------------------------------------------------------

EXACT = [
    pytest.param(None, "40", id="null"),
    pytest.param(True, "41", id="true"),
    pytest.param(False, "42", id="false"),
    pytest.param(UInt(0), "43", id="uint0"),
    pytest.param(UInt(7), "5207", id="smalluint"),
    pytest.param(UInt(256), "7000000100", id="uint"),
    pytest.param(ULong(0), "44", id="ulong0"),
    pytest.param(ULong(0x10), "5310", id="smallulong"),
    pytest.param(ULong(2**40), "800000010000000000", id="ulong"),
    pytest.param(UByte(255), "50ff", id="ubyte"),
    pytest.param(UShort(513), "600201", id="ushort"),
    pytest.param(Byte(-1), "51ff", id="byte"),
    pytest.param(Short(-2), "61fffe", id="short"),
    pytest.param(Int(-1), "54ff", id="smallint"),
    pytest.param(Int(1000), "71000003e8", id="int"),
    pytest.param(Long(5), "5505", id="smalllong"),
    pytest.param(Long(-(2**40)), "81ffffff0000000000", id="long"),
    pytest.param(Float(1.0), "723f800000", id="float"),
    pytest.param(1.0, "823ff0000000000000", id="double"),
    pytest.param(Timestamp(1), "830000000000000001", id="timestamp"),
    pytest.param(Char("A"), "7300000041", id="char"),
    pytest.param(Decimal32(b"\x01\x02\x03\x04"), "7401020304", id="decimal32"),
    pytest.param(uuid.UUID(int=1), "98" + "00" * 15 + "01", id="uuid"),
    pytest.param(b"ab", "a0026162", id="vbin8"),
    pytest.param("ab", "a1026162", id="str8"),
    pytest.param(Symbol("ab"), "a3026162", id="sym8"),
    pytest.param(b"x" * 256, "b000000100" + "78" * 256, id="vbin32"),
    pytest.param([], "45", id="list0"),
    pytest.param([None, True], "c003024041", id="list8"),
    pytest.param({Symbol("k"): None}, "c10502a3016b40", id="map8"),
    pytest.param(Described(ULong(0x10), ["c"]), "005310c00401a10163", id="described"),
    pytest.param(symbol_array(["AB", "C"]), "e00702a30241420143", id="array8-sym"),
]


@pytest.mark.parametrize(("value", "hex_"), EXACT)
def test_exact_encoding(value: Any, hex_: str) -> None:
    assert encode(value).hex() == hex_
    assert decode_all(bytes.fromhex(hex_)) == value


# --- round trips and truncations ---------------------------------------------------------------

ROUND_TRIP = [
    pytest.param("x" * 300, id="str32"),
    pytest.param(Symbol("s" * 256), id="sym32"),
    pytest.param(list(range(300)), id="list32-count"),
    pytest.param(["y" * 300], id="list32-size"),
    pytest.param({str(i): i for i in range(200)}, id="map32"),
    pytest.param(Described(Symbol("amqp:open:list"), ["c", None, UInt(512)]), id="described-symbol"),
    pytest.param(Array(TypeCode.UINT, (UInt(1), UInt(300), UInt(0))), id="array-uint"),
    pytest.param(Array(TypeCode.SYM32, (Symbol("a" * 300),)), id="array32-sym"),
    pytest.param(Array(TypeCode.LIST32, ([1], [], ["z"])), id="array-list"),
    pytest.param(Array(TypeCode.MAP32, ({1: 2}, {})), id="array-map"),
    pytest.param(Array(TypeCode.ARRAY32, (symbol_array("a"), symbol_array("bc"))), id="array-array"),
    pytest.param(Array(TypeCode.BOOLEAN, (True, False)), id="array-bool"),
    pytest.param(Array(TypeCode.NULL, (None, None, None)), id="array-null"),
    pytest.param(Array(TypeCode.ULONG, (ULong(5),), descriptor=Symbol("d")), id="array-described"),
    pytest.param(Array(TypeCode.UUID, (uuid.UUID(int=7),)), id="array-uuid"),
    pytest.param(Array(TypeCode.CHAR, (Char("é"),)), id="array-char"),
    pytest.param(Array(TypeCode.STR32, ()), id="array-empty"),
    pytest.param(Decimal64(b"12345678"), id="decimal64"),
    pytest.param(Decimal128(b"0123456789abcdef"), id="decimal128"),
    pytest.param(ULong(2**64 - 1), id="ulong-max"),
    pytest.param(Long(-(2**63)), id="long-min"),
    pytest.param([[[[["deep"]]]]], id="nested"),
]


@pytest.mark.parametrize(
    "value", [p.values[0] for p in EXACT + ROUND_TRIP], ids=[p.id for p in EXACT + ROUND_TRIP]
)
def test_round_trip_and_every_truncation(value: Any) -> None:
    data = encode(value)
    decoded = decode_all(data)
    assert decoded == value
    assert type(decoded) is type(value) or type(value) in (int, list, tuple)
    rest, again = decode_value(data + b"\x40tail")  # what follows a value is left alone
    assert again == value and bytes(rest) == b"\x40tail"
    for length in range(len(data)):
        with pytest.raises(InsufficientData):
            decode_value(data[:length])


def test_plain_python_values_encode_as_their_amqp_types() -> None:
    assert decode_all(encode(5)) == Long(5) and type(decode_all(encode(5))) is Long
    assert decode_all(encode((1, "a"))) == [Long(1), "a"]
    assert decode_all(encode(bytearray(b"q"))) == b"q"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: UInt(-1), id="uint-negative"),
        pytest.param(lambda: UByte(256), id="ubyte-too-big"),
        pytest.param(lambda: Symbol("é"), id="symbol-not-ascii"),
        pytest.param(lambda: Char("ab"), id="char-two"),
        pytest.param(lambda: Decimal32(b"1"), id="decimal-width"),
        pytest.param(lambda: encode({1, 2}), id="set"),
        pytest.param(lambda: encode(Float(1e300)), id="float-overflow"),
        pytest.param(lambda: encode(Array(TypeCode.UINT, ("x",))), id="array-wrong-element"),
        pytest.param(lambda: encode(Array(TypeCode.NULL, (1,))), id="array-null-element"),
        pytest.param(lambda: encode("\ud800"), id="lone-surrogate"),
        pytest.param(lambda: Described("x", 1), id="descriptor-str"),  # type: ignore[arg-type]
        pytest.param(lambda: Array(TypeCode.SMALLUINT), id="array-narrow-element"),
    ],
)
def test_misuse_is_a_local_protocol_error(bad: Any) -> None:
    with pytest.raises(LocalProtocolError):
        bad()


MALFORMED = [
    pytest.param("01", id="unknown-code"),
    pytest.param("5602", id="boolean-2"),
    pytest.param("a102c328", id="bad-utf8"),
    pytest.param("a301e9", id="symbol-not-ascii"),
    pytest.param("73 00110000", id="char-too-big"),
    pytest.param("73 0000d800", id="char-surrogate"),
    pytest.param("c0 00", id="list8-no-count"),
    pytest.param("c0 02 02 40", id="list8-overrun"),
    pytest.param("c0 03 01 40 40", id="list8-trailing"),
    pytest.param("c0 02 05 40", id="list8-count-too-big"),
    pytest.param("c1 02 01 40", id="map-odd"),
    pytest.param("c1 07 04 5401 40 5401 40", id="map-duplicate-key"),
    pytest.param("c1 03 02 45 40", id="map-unhashable-key"),
    pytest.param("00 a1 01 78 40", id="descriptor-string"),
    pytest.param("00 00 5301 40 40", id="descriptor-described"),
    pytest.param("e0 02 05 70", id="array-count-too-big"),
    pytest.param("e0 03 01 01 00", id="array-unknown-element"),
    pytest.param("e0 04 01 70 0000", id="array-element-overrun"),
    pytest.param("e0 04 00 40 40 40", id="array-trailing"),
    pytest.param("e0 06 01 00 5301 00 40", id="array-described-twice"),
    pytest.param("f0 00000005 000007d0 40", id="array-too-many-empty-elements"),
    pytest.param("f0 00000002 0000", id="array32-no-count"),
    pytest.param("d0 00000003 000000", id="list32-no-count"),
]


@pytest.mark.parametrize("hex_", MALFORMED)
def test_malformed_is_a_decode_error(hex_: str) -> None:
    with pytest.raises(AmqpProtocolError) as info:
        decode_value(bytes.fromhex(hex_.replace(" ", "")))
    assert info.value.condition == "amqp:decode-error"


def test_nesting_is_bounded() -> None:
    data = encode(None)
    for _ in range(MAX_DEPTH + 2):
        data = b"\x00\x53\x01" + data  # described(described(...))
    with pytest.raises(AmqpProtocolError, match="nested"):
        decode_value(data)
    ok = encode(None)
    for _ in range(MAX_DEPTH // 2 - 1):
        ok = b"\x00\x53\x01" + ok
    decode_all(ok)


def test_huge_sizes_need_data_instead_of_allocating() -> None:
    with pytest.raises(InsufficientData):
        decode_value(bytes.fromhex("b0ffffffff00"))
    with pytest.raises(InsufficientData):
        decode_value(bytes.fromhex("d0ffffffffffffffff"))


# --- property tests and fuzzing ----------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(0, 255).map(UByte),
    st.integers(0, 2**16 - 1).map(UShort),
    st.integers(0, 2**32 - 1).map(UInt),
    st.integers(0, 2**64 - 1).map(ULong),
    st.integers(-128, 127).map(Byte),
    st.integers(-(2**15), 2**15 - 1).map(Short),
    st.integers(-(2**31), 2**31 - 1).map(Int),
    st.integers(-(2**63), 2**63 - 1).map(Long),
    st.integers(-(2**63), 2**63 - 1).map(Timestamp),
    st.floats(allow_nan=False, width=32).map(Float),
    st.floats(allow_nan=False),
    st.characters(exclude_categories=["Cs"]).map(Char),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=60).map(Symbol),
    st.binary(max_size=60),
    st.uuids(),
    st.binary(min_size=4, max_size=4).map(Decimal32),
)
_keys = st.one_of(st.text(max_size=20), st.integers(-(2**63), 2**63 - 1).map(Long))
_arrays = st.one_of(
    st.lists(st.text(alphabet=st.characters(max_codepoint=127), max_size=60).map(Symbol), max_size=5).map(
        lambda xs: Array(TypeCode.SYM32, tuple(xs))
    ),
    st.lists(st.integers(0, 2**32 - 1).map(UInt), max_size=5).map(lambda xs: Array(TypeCode.UINT, tuple(xs))),
    st.lists(st.binary(max_size=60), max_size=3).map(lambda xs: Array(TypeCode.VBIN32, tuple(xs))),
)


def _described(pair: tuple[Any, Any]) -> Described:
    return Described(*pair)


def _list_array(items: list[Any]) -> Array:
    return Array(TypeCode.LIST32, tuple(items))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    descriptors = st.one_of(
        st.integers(0, 2**64 - 1).map(ULong), st.text(alphabet="abc:", max_size=10).map(Symbol)
    )
    return st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(_keys, children, max_size=6),
        st.tuples(descriptors, children).map(_described),
        st.lists(st.lists(children, max_size=3), max_size=3).map(_list_array),
    )


amqp_values = st.recursive(st.one_of(_scalars, _arrays), _containers, max_leaves=20)


@given(amqp_values)
@settings(max_examples=300, deadline=None)
def test_any_value_round_trips(value: Any) -> None:
    assert decode_all(encode(value)) == value


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        decode_value(data)
    except (InsufficientData, AmqpProtocolError):
        pass


@given(st.binary(max_size=200))
@settings(max_examples=2000, deadline=None)
def test_arbitrary_bytes_decode_or_raise_the_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)


#: Mutated encodings the fuzz tries (reported in the issue: keep the number stable).
FUZZ_INPUTS = 20_000


def test_fuzz_mutated_encodings(capsys: pytest.CaptureFixture[str]) -> None:
    """Flip, insert, delete and overwrite bytes of valid encodings; the decoder must decode or
    raise InsufficientData/AmqpProtocolError, nothing else."""
    rng = random.Random(6)
    seeds = [encode(p.values[0]) for p in EXACT + ROUND_TRIP]
    tried = 0
    for _ in range(FUZZ_INPUTS):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data) + 1)
            op = rng.randrange(4)
            if op == 0 and where < len(data):
                data[where] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[where:where] = bytes([rng.randrange(256)])
            elif op == 2 and where < len(data):
                del data[where]
            elif where < len(data):
                data[where] = rng.choice((0x00, 0xFF, 0x40, 0xE0, 0xF0, 0xD0, 0xB0, 0x80))
        _decode_or_protocol_error(bytes(data))
        tried += 1
    assert tried == FUZZ_INPUTS
    with capsys.disabled():
        print(f"\n[amqp fuzz] type codec: {tried} mutated encodings tried")  # noqa: T201 (the report line)
