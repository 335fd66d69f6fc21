"""Data preparation as in ColossalChat's examples: read the seed's SFT, preference, prompt and ptx formats (JSON,
JSONL, folders, local Hugging Face datasets; `from`/`role` and `human`/`user` spellings) and validate them with
errors that name the file, record and field (`formats`); apply a conversation template config (`templates`);
tokenise with assistant-only labels (`tokenize`); write and load `arrow/part-XXXXX` shards plus readable
`jsonl/part-XXXXX.jsonl` copies (`shards`). `relay.launch.prepare_cmd.prepare` ties the steps together for
`relay prepare` and the pipelines; `demo` builds a small real data set from the `chitchat-dataset` package.
Trainers load prepared data with `relay.data.shards.load_prepared`.
"""
