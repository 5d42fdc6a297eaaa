"""Offline text-to-speech through espeak-ng (ctypes; library + voices from `espeakng_loader`).

espeak-ng runs in synchronous mode: `espeak_Synth` calls our callback with 22,050 Hz int16
audio and event records; PHONEME events give the IPA symbol and its start time (ms), WORD
events the text offset and start time. `synthesize` returns 16 kHz float32 audio with phone
and word timings in seconds. The library is initialised once per process; calls are serialised
with a lock (espeak-ng keeps global state), so it is safe to call from many threads.

espeak-ng is GPL-3: we link to the copy `espeakng_loader` installs, we do not vendor it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading

import numpy as np

from avjax.data.audio import SAMPLE_RATE, resample

ESPEAK_RATE = 22050

# espeak_EVENT_TYPE
_EV_LIST_TERMINATED = 0
_EV_WORD = 1
_EV_END = 5
_EV_MSG_TERMINATED = 6
_EV_PHONEME = 7
# espeak_PARAMETER
_P_RATE, _P_VOLUME, _P_PITCH, _P_RANGE = 1, 2, 3, 4
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS, _INIT_PHONEME_IPA = 1, 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
DEFAULT_RATE_WPM = 175
DEFAULT_PITCH = 50


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclasses.dataclass
class Synthesis:
    """Result of `synthesize`.

    Attributes:
      wav: float32 `[samples]` at `sample_rate`.
      sample_rate: 16000 unless asked otherwise.
      phones: `(start_s, end_s, ipa)` in time order, contiguous, the last ending at the audio's
        end; pauses are phones too (espeak reports them as "_" or similar symbols).
      words: `(start_s, word)` in time order.
    """

    wav: np.ndarray
    sample_rate: int
    phones: list[tuple[float, float, str]]
    words: list[tuple[float, str]]

    @property
    def duration(self) -> float:
        return len(self.wav) / self.sample_rate


class _Engine:
    """The process-wide espeak-ng instance."""

    def __init__(self) -> None:
        import espeakng_loader

        lib_path = espeakng_loader.get_library_path()
        data_path = espeakng_loader.get_data_path()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise RuntimeError(f"cannot load espeak-ng library {lib_path}: {e}") from e
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS,
            0,
            data_path.encode(),
            _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA,
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data path {data_path}")
        self.rate = rate
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, bytes]] = []
        # Keep a reference: ctypes callbacks are freed when garbage collected.
        self._callback = _Callback(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    def _on_synth(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while True:
            ev = events[i]
            if ev.type == _EV_LIST_TERMINATED:
                break
            if ev.type == _EV_PHONEME:
                self._events.append((ev.type, ev.audio_position, 0, 0, bytes(ev.id.string)))
            elif ev.type == _EV_WORD:
                self._events.append((ev.type, ev.audio_position, ev.text_position, ev.length, b""))
            i += 1
        return 0

    def synth(
        self, text: str, voice: str, rate_wpm: int, pitch: int
    ) -> tuple[np.ndarray, list[tuple[int, int, int, int, bytes]]]:
        lib = self.lib
        if voice != self._voice:
            name = voice
            base, _, variant = voice.partition("+")
            if base.lower() == "en-gb":  # espeak-ng names British English plain "en"
                name = "en" + ("+" + variant if variant else "")
            if lib.espeak_SetVoiceByName(name.encode()) != 0:
                self._voice = None
                raise ValueError(f"espeak-ng has no voice {voice!r} (e.g. 'en-us', 'en-gb+m3')")
            self._voice = voice
        lib.espeak_SetParameter(_P_RATE, int(rate_wpm), 0)
        lib.espeak_SetParameter(_P_PITCH, int(pitch), 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data, len(data))
        err = lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} on text {text[:60]!r}")
        lib.espeak_Synchronize()
        wav = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        events = self._events
        self._chunks, self._events = [], []
        return wav, events


_ENGINE: _Engine | None = None
_LOCK = threading.Lock()


def _engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def synthesize(
    text: str,
    voice: str = "en-us",
    rate_wpm: int | None = None,
    pitch: int | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> Synthesis:
    """Speaks `text` with an espeak-ng voice.

    Args:
      text: UTF-8 text (plain, no SSML).
      voice: espeak-ng voice name, optionally with a variant: "en-us", "en-us+f3", "en-gb+m3".
      rate_wpm: speaking rate in words per minute (espeak default 175; 80..450).
      pitch: base pitch 0..100 (default 50).
      sample_rate: output rate; espeak's 22,050 Hz audio is resampled to it.

    Returns:
      `Synthesis` with `wav` float32 `[samples]` and phone/word timings in seconds.
    """
    if not text.strip():
        raise ValueError("synthesize: empty text")
    rate_wpm = DEFAULT_RATE_WPM if rate_wpm is None else rate_wpm
    pitch = DEFAULT_PITCH if pitch is None else pitch
    with _LOCK:
        eng = _engine()
        pcm, events = eng.synth(text, voice, rate_wpm, pitch)
        native_rate = eng.rate
    wav = resample(pcm.astype(np.float32) / 32768.0, native_rate, sample_rate)
    duration = len(wav) / sample_rate
    raw = text.encode("utf-8")
    starts: list[tuple[float, str]] = []
    words: list[tuple[float, str]] = []
    for typ, pos_ms, text_pos, length, sym in events:
        t = min(max(pos_ms / 1000.0, 0.0), duration)
        if typ == _EV_PHONEME:
            s = sym.split(b"\0", 1)[0].decode("utf-8", errors="replace")
            if s:
                starts.append((t, s))
        else:
            w = raw[max(text_pos - 1, 0) : max(text_pos - 1, 0) + length].decode(
                "utf-8", errors="replace"
            )
            words.append((t, w.strip()))
    starts.sort(key=lambda x: x[0])
    phones: list[tuple[float, float, str]] = []
    for i, (t, s) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else duration
        if end > t:
            phones.append((t, end, s))
    if phones and phones[0][0] > 0:  # leading silence before the first phone event
        phones.insert(0, (0.0, phones[0][0], "_"))
    words.sort(key=lambda x: x[0])
    return Synthesis(wav=wav, sample_rate=sample_rate, phones=phones, words=words)


# Distinct "speakers": (voice, pitch, rate_wpm). Variants change formants/timbre; pitch and rate
# spread them further apart.
SPEAKERS: tuple[tuple[str, int, int], ...] = (
    ("en-us", 50, 170),
    ("en-us+f3", 62, 165),
    ("en-gb+m3", 40, 160),
    ("en-us+m7", 35, 175),
    ("en-gb-x-rp+f2", 70, 155),
    ("en-us+f4", 58, 180),
    ("en-gb-scotland+m1", 45, 165),
    ("en-029+m2", 48, 170),
    ("en-us+f1", 66, 160),
    ("en-gb+m5", 38, 150),
    ("en-us-nyc+m4", 52, 185),
    ("en-gb+f5", 60, 170),
)
