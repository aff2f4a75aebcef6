"""Spoken coding instructions (paper section 5.2): judge -> rewrite -> voice-cloned TTS -> sharded assembly.

Entry point: `pipeline.run(SynthConfig)`, CLI `tools/synth_audio.py`. Row r (1-based input line) goes to
shard (r - 1) % num_shards. Output directory layout (TAG = `IIIII-of-NNNNN`):

- `samples-TAG.jsonl`: one line per input row, in input order, never dropped. A valid row is the input
  object (`messages`, `tools`, any other keys untouched) plus `synth = {"row": r, "turns": [...]}` with
  one entry per user turn: `{"message": i, "decision": DIRECT|REWRITE|NO, "voice", "duration_s"}` when
  voiced, plus `judge_error`, `fidelity_lost` or `tts_error` when it stayed text, or
  `{"message": i, "skipped": "empty content"|"non-string content"|"too long"}`. A voiced user turn is
  `{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": BASE64_WAV,
  "format": "wav"}}], "transcription": SPOKEN_TEXT}` (16 kHz mono PCM_16). An invalid row (policy
  `keep`) is `{"synth": {"row": r, "error": "FILE:ROW: FIELD: reason"}, "raw": original_line}`.
- `judgments-TAG.jsonl`: every judge call: row, message, input, decision, spoken_text, model, latency_s,
  error, fidelity_lost. It doubles as the request cache: a resumed run never asks the judge twice.
- `wds/shard-TAG.tar` (WebDataset, valid rows only): key `r{row:09d}`; `KEY.json` is the sample with each
  `input_audio.data` replaced by a member name `audio_K.wav`; `KEY.audio_K.wav` is that WAV.
  `wds/.nv-meta/` comes from `energon prepare` (CrudeWebdataset, everything in the train split).
- `report.json`: decision counts and fractions, voiced turns, TTS failures, fidelity rejections, judge
  errors, skipped turns and invalid rows with their row numbers, audio hours, per-shard progress.
- `run.json` (settings a resume must keep), `completions/TAG` (shard finished), `.locks/` (reservations).
"""
