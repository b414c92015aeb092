"""Novel corpora -> packed, deduplicated token blocks for continued pretraining (stage 1, CPT).

    tifa data novels books/ extra.epub --out data/cpt --tokenizer models/tiny --block-size 2048

One module per stage of the ingest; each imports only those listed above it:
    read.py     files -> decoded, normalised chapters (.txt in blocks, .epub by its spine), FileReport
    encode.py   texts -> token ids equal to the tokenizer's: the C kernel's glue and the fallbacks
    dedup.py    exact and near-duplicate chapters: digests, MinHash signatures, the LSH index
    pack.py     chapters prepared in worker processes -> token stream -> blocks -> Arrow shards
    command.py  `ingest_novels`, stats.json and the `tifa data novels` command (top of the stack)
This file re-exports the names other code uses (`from tifaforge.data.novels import ingest_novels`).
"""

from tifaforge.data.novels.command import NovelsOptions, ingest_novels, novels_arguments, novels_command, resolve_tokenizer
from tifaforge.data.novels.dedup import Deduper, lsh_bands, shingle_hashes, signature, signature_numpy
from tifaforge.data.novels.encode import (
    GPT2_SPLIT,
    QWEN2_SPLIT,
    NativeEncoder,
    TextEncoder,
    WordCacheEncoder,
    native_kernel,
)
from tifaforge.data.novels.pack import Packer, Timers, end_of_text
from tifaforge.data.novels.read import FileReport, SkipFile, file_chapters, find_inputs

__all__ = [
    "GPT2_SPLIT", "QWEN2_SPLIT", "Deduper", "FileReport", "NativeEncoder", "NovelsOptions", "Packer", "SkipFile",
    "TextEncoder", "Timers", "WordCacheEncoder", "end_of_text", "file_chapters", "find_inputs", "ingest_novels",
    "lsh_bands", "native_kernel", "novels_arguments", "novels_command", "resolve_tokenizer", "shingle_hashes",
    "signature", "signature_numpy",
]
