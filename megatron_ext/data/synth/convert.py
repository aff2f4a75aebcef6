"""One input row -> one output sample: judge each user turn, voice the speakable ones, keep the rest.

Nothing is dropped: invalid rows become `{"synth": {"row", "error"}, "raw": line}`, and a turn the judge
says NO to, that fails the fidelity check, or whose TTS fails keeps its original text.
"""

from dataclasses import dataclass

from megatron_ext.audio.tts import TTS
from megatron_ext.audio.voices import RefVoice, pick_voice
from megatron_ext.audio.waveform import SAMPLE_RATE, encode_wav
from megatron_ext.data.synth.conversation import audio_turn, parse_row, speech_candidates
from megatron_ext.data.synth.errors import InputError
from megatron_ext.data.synth.fidelity import lost_tokens
from megatron_ext.data.synth.judge import Judge


@dataclass
class Converted:
    """The sample for one row, the judgments made for it (not those reused), and warnings to show."""

    sample: dict
    judgments: list[dict]
    warning: str | None = None


class RowConverter:
    """Judge + TTS for rows of one input file; `cache` holds judgments logged by an earlier attempt."""

    def __init__(
        self,
        input_name: str,
        judge: Judge,
        tts: TTS,
        voices: list[RefVoice],
        seed: int,
        max_chars: int,
        cache: dict[tuple[int, int], dict],
    ):
        self.input_name, self.judge, self.tts, self.voices = input_name, judge, tts, voices
        self.seed, self.max_chars, self.cache = seed, max_chars, cache

    def convert(self, row: int, line: str) -> Converted:
        try:
            obj = parse_row(line, self.input_name, row)
        except InputError as e:
            return Converted({"synth": {"row": row, "error": str(e)}, "raw": line}, [], str(e))
        candidates, turns = speech_candidates(obj, self.max_chars)
        messages = list(obj["messages"])
        new = []
        for i in candidates:
            judgment = self.cache.get((row, i))
            if judgment is None:
                judgment = self._judge(row, i, messages[i]["content"])
                new.append(judgment)
            turn, voiced = self._speak(row, i, judgment)
            if voiced is not None:
                messages[i] = {**messages[i], **voiced}
            turns.append(turn)
        turns.sort(key=lambda t: t["message"])
        return Converted({**obj, "messages": messages, "synth": {"row": row, "turns": turns}}, new)

    def _judge(self, row: int, message: int, text: str) -> dict:
        verdict = self.judge.judge(text)
        lost = lost_tokens(text, verdict.spoken_text) if verdict.decision == "REWRITE" else []
        return {"row": row, "message": message, "input": text, **verdict.to_dict(), "fidelity_lost": lost}

    def _speak(self, row: int, message: int, judgment: dict) -> tuple[dict, dict | None]:
        """The turn's metadata and, when it was voiced, the replacement user turn."""
        turn = {"message": message, "decision": judgment["decision"]}
        if judgment["error"]:
            turn["judge_error"] = judgment["error"]
        if judgment["decision"] == "NO":
            return turn, None
        if judgment["fidelity_lost"]:
            return turn | {"fidelity_lost": judgment["fidelity_lost"]}, None
        voice = pick_voice(self.voices, self.seed, row, message) if self.tts.clones_voice else None
        try:
            samples = self.tts.synthesize(judgment["spoken_text"], voice)
        except Exception as e:  # any engine failure keeps the text turn; it is counted, never fatal
            return turn | {"tts_error": f"{type(e).__name__}: {e}"}, None
        voice_name = voice.name if voice else self.tts.name
        turn |= {"voice": voice_name, "duration_s": round(len(samples) / SAMPLE_RATE, 3)}
        return turn, audio_turn(encode_wav(samples), judgment["spoken_text"])
