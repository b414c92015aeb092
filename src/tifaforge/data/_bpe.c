/* Byte-level BPE for the novel ingest: pre-tokenise and merge in one pass over a batch of texts.
 *
 * Why by hand: the ingest's bound is tokenising (tifaforge/data/novels.py). The Rust `tokenizers`
 * library spends most of its time on per-pre-token bookkeeping (offsets, normalised-string alignment,
 * allocations) that packing never reads, and tiktoken, though faster, merges by the rank of the
 * merged token rather than by the merge list, which gives other ids for vocabularies where a token can
 * be made from two different pairs (a third of the tiny preset's texts differ). This kernel does what
 * HF's BPE model does, merge for merge (Word::merge_all: the pair of lowest merge rank first, the
 * leftmost of equal ranks), after splitting each text with the tokenizer's own pattern (Qwen2's or
 * GPT-2's, written out as the regex engine would match them). The Python side (NativeEncoder) checks
 * every character class against the Rust pre-tokenizer the first time it meets a character and sends
 * texts it cannot reproduce to the Rust tokenizer whole, so the ids are the tokenizer's.
 *
 * Characters are merged ahead where that is exact: a character whose bytes always become the same
 * tokens before any merge reaches across its edges (every merge that takes one of its edge states with
 * an outside token ranks after its own last merge) starts the word as those tokens, not as bytes. The
 * merges left are the ones HF would still make, in the same order (a Chinese word starts with a third
 * of the symbols). Which characters qualify is worked out the first time each is met (model_premerged).
 *
 * Python API (every array is a C-contiguous buffer; numpy arrays work):
 *   model(left i32[m], right i32[m], new i32[m], byte_ids i32[256]) -> a BPE model: merge i is
 *       (left[i], right[i]) -> new[i], ranked i; byte_ids[b] is byte b's token
 *   split(codes u32[], ends i64[t], cls u8[0x110000], mode, out_ends i64[]) -> pieces
 *   encode(codes u32[], ends i64[t], cls u8[], model, mode, out i32[], out_ends i64[t], cache) -> tokens
 *       cache: None or cache(); a model and a cache are used by one thread at a time
 * `codes` is the texts' code points back to back, `ends[i]` the end of text i; mode 0 is Qwen2's
 * pattern, 1 GPT-2's. `cls` classes each code point: 1 letter (\p{L}), 2 number (\p{N}), 4 white
 * space (\s), 8 CR or LF. `out` needs room for one token per UTF-8 byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define K_L 1
#define K_N 2
#define K_S 4
#define K_NL 8
#define EMPTY_KEY UINT64_MAX

typedef struct {
    const uint8_t *cls;
} Classes;

static inline uint8_t klass(const Classes *c, uint32_t cp) { return cp < 0x110000 ? c->cls[cp] : 0; }

/* 's 't 're 've 'm 'll 'd at pos (ASCII case folded when ci); the end or 0. */
static Py_ssize_t contraction(const uint32_t *t, Py_ssize_t pos, Py_ssize_t e, int ci) {
    if (t[pos] != '\'' || pos + 1 >= e) return 0;
    uint32_t a = t[pos + 1], b = pos + 2 < e ? t[pos + 2] : 0;
    if (ci) {
        if (a >= 'A' && a <= 'Z') a += 32;
        if (b >= 'A' && b <= 'Z') b += 32;
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return pos + 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return pos + 3;
    return 0;
}

static inline Py_ssize_t run_of(const Classes *c, const uint32_t *t, Py_ssize_t p, Py_ssize_t e, uint8_t any) {
    while (p < e && (klass(c, t[p]) & any)) p++;
    return p;
}

static inline Py_ssize_t run_not(const Classes *c, const uint32_t *t, Py_ssize_t p, Py_ssize_t e, uint8_t none) {
    while (p < e && !(klass(c, t[p]) & none)) p++;
    return p;
}

/* \s+(?!\S)|\s+ from pos (a white space character), after the alternatives before them failed. */
static Py_ssize_t spaces(const Classes *c, const uint32_t *t, Py_ssize_t pos, Py_ssize_t e) {
    Py_ssize_t run = run_of(c, t, pos, e, K_S);
    if (run == e) return e;
    return run - pos >= 2 ? run - 1 : run;
}

/* Qwen2: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static Py_ssize_t qwen2_end(const Classes *c, const uint32_t *t, Py_ssize_t pos, Py_ssize_t e) {
    Py_ssize_t end = contraction(t, pos, e, 1);
    if (end) return end;
    uint8_t k = klass(c, t[pos]);
    if (!(k & (K_L | K_N | K_NL)) && pos + 1 < e && (klass(c, t[pos + 1]) & K_L))
        return run_of(c, t, pos + 2, e, K_L);
    if (k & K_L) return run_of(c, t, pos + 1, e, K_L);
    if (k & K_N) return pos + 1;
    Py_ssize_t p = pos;
    if (t[p] == ' ' && p + 1 < e && !(klass(c, t[p + 1]) & (K_S | K_L | K_N))) p++;
    if (!(klass(c, t[p]) & (K_S | K_L | K_N))) {
        end = run_not(c, t, p + 1, e, K_S | K_L | K_N);
        return run_of(c, t, end, e, K_NL);
    }
    /* white space: \s*[\r\n]+ ends after the run's last CR/LF; else \s+(?!\S) or \s+ */
    Py_ssize_t run = pos, last_nl = -1;
    while (run < e && (klass(c, t[run]) & K_S)) {
        if (klass(c, t[run]) & K_NL) last_nl = run;
        run++;
    }
    if (last_nl >= 0) return last_nl + 1;
    return spaces(c, t, pos, e);
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static Py_ssize_t gpt2_end(const Classes *c, const uint32_t *t, Py_ssize_t pos, Py_ssize_t e) {
    Py_ssize_t end = contraction(t, pos, e, 0);
    if (end) return end;
    int sp = t[pos] == ' ' && pos + 1 < e;
    uint8_t k = klass(c, t[pos]), k1 = sp ? klass(c, t[pos + 1]) : 0;
    if (sp && (k1 & K_L)) return run_of(c, t, pos + 2, e, K_L);
    if (k & K_L) return run_of(c, t, pos + 1, e, K_L);
    if (sp && (k1 & K_N)) return run_of(c, t, pos + 2, e, K_N);
    if (k & K_N) return run_of(c, t, pos + 1, e, K_N);
    if (sp && !(k1 & (K_S | K_L | K_N))) return run_not(c, t, pos + 2, e, K_S | K_L | K_N);
    if (!(k & (K_S | K_L | K_N))) return run_not(c, t, pos + 1, e, K_S | K_L | K_N);
    return spaces(c, t, pos, e);
}

static inline Py_ssize_t piece_end(const Classes *c, const uint32_t *t, Py_ssize_t pos, Py_ssize_t e, int mode) {
    return mode == 0 ? qwen2_end(c, t, pos, e) : gpt2_end(c, t, pos, e);
}

/* ---- merge table: open addressing, key = left << 32 | right, value = rank << 32 | new id ---- */

static inline uint64_t slot_of(uint64_t key, uint64_t mask) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return key & mask;
}

static inline int lookup(const uint64_t *table, uint64_t mask, uint32_t a, uint32_t b,
                         uint32_t *rank, int32_t *id) {
    uint64_t key = ((uint64_t)a << 32) | b, s = slot_of(key, mask);
    for (;;) {
        uint64_t k = table[2 * s];  /* key and value side by side: one cache line */
        if (k == key) {
            *rank = (uint32_t)(table[2 * s + 1] >> 32);
            *id = (int32_t)(uint32_t)table[2 * s + 1];
            return 1;
        }
        if (k == EMPTY_KEY) return 0;
        s = (s + 1) & mask;
    }
}

/* ---- one word: HF's Word::merge_all with a binary heap of (rank, position) ---- */

typedef struct {
    uint32_t rank, pos;
    int32_t id;
} Merge;

typedef struct {
    int32_t *sym;        /* symbol id per position (start byte of the symbol) */
    int32_t *prev, *next;
    uint8_t *alive;
    Merge *heap;
    Py_ssize_t cap, heap_cap;
    int32_t *init;       /* a word's starting symbols */
    Py_ssize_t init_cap;
} Scratch;

static int grow(Scratch *s, Py_ssize_t n) {
    if (n <= s->cap) return 0;
    Py_ssize_t cap = n > 2 * s->cap ? n : 2 * s->cap;
    void *a = realloc(s->sym, cap * sizeof(int32_t)), *b, *d, *f;
    if (!a) return -1;
    s->sym = a;
    if (!(b = realloc(s->prev, cap * sizeof(int32_t)))) return -1;
    s->prev = b;
    if (!(d = realloc(s->next, cap * sizeof(int32_t)))) return -1;
    s->next = d;
    if (!(f = realloc(s->alive, cap))) return -1;
    s->alive = f;
    if (!(a = realloc(s->heap, 2 * cap * sizeof(Merge)))) return -1;  /* n-1 initial + 2 per merge, at most */
    s->heap = a;
    s->heap_cap = 2 * cap;
    s->cap = cap;
    return 0;
}

static inline int before(const Merge *x, const Merge *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static inline void push(Merge *h, Py_ssize_t *n, Merge m) {
    Py_ssize_t i = (*n)++;
    while (i > 0) {
        Py_ssize_t p = (i - 1) / 2;
        if (!before(&m, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = m;
}

static inline Merge pop(Merge *h, Py_ssize_t *n) {
    Merge top = h[0], last = h[--(*n)];
    Py_ssize_t i = 0, size = *n;
    for (;;) {
        Py_ssize_t l = 2 * i + 1, r = l + 1, m = i;
        const Merge *best = &last;
        if (l < size && before(&h[l], best)) { m = l; best = &h[l]; }
        if (r < size && before(&h[r], best)) { m = r; }
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (size) h[i] = last;
    return top;
}

/* BPE of a word from its starting symbols init[0..n): ids appended at out; returns how many. */
static Py_ssize_t bpe_word(Scratch *s, const int32_t *init, Py_ssize_t n, const uint64_t *table, uint64_t mask,
                           int32_t *out) {
    if (n == 1) {
        out[0] = init[0];
        return 1;
    }
    int32_t *sym = s->sym, *prev = s->prev, *next = s->next;
    uint8_t *alive = s->alive;
    Merge *heap = s->heap;
    Py_ssize_t hn = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        sym[i] = init[i];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        alive[i] = 1;
    }
    uint32_t rank;
    int32_t id;
    for (Py_ssize_t i = 0; i + 1 < n; i++)
        if (lookup(table, mask, (uint32_t)sym[i], (uint32_t)sym[i + 1], &rank, &id))
            push(heap, &hn, (Merge){rank, (uint32_t)i, id});
    while (hn) {
        Merge m = pop(heap, &hn);
        Py_ssize_t p = m.pos;
        if (!alive[p] || next[p] < 0) continue;
        Py_ssize_t q = next[p];
        /* stale: the pair at p is no longer the one this entry was made for */
        if (!lookup(table, mask, (uint32_t)sym[p], (uint32_t)sym[q], &rank, &id) || id != m.id) continue;
        sym[p] = id;
        alive[q] = 0;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = (int32_t)p;
        if (prev[p] >= 0 && lookup(table, mask, (uint32_t)sym[prev[p]], (uint32_t)sym[p], &rank, &id))
            push(heap, &hn, (Merge){rank, (uint32_t)prev[p], id});
        if (next[p] >= 0 && lookup(table, mask, (uint32_t)sym[p], (uint32_t)sym[next[p]], &rank, &id))
            push(heap, &hn, (Merge){rank, (uint32_t)p, id});
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i >= 0; i = next[i]) out[k++] = sym[i];
    return k;
}

static inline Py_ssize_t utf8(uint32_t c, uint8_t *o) {
    if (c < 0x80) { o[0] = (uint8_t)c; return 1; }
    if (c < 0x800) { o[0] = 0xC0 | (c >> 6); o[1] = 0x80 | (c & 0x3F); return 2; }
    if (c < 0x10000) { o[0] = 0xE0 | (c >> 12); o[1] = 0x80 | ((c >> 6) & 0x3F); o[2] = 0x80 | (c & 0x3F); return 3; }
    o[0] = 0xF0 | (c >> 18); o[1] = 0x80 | ((c >> 12) & 0x3F); o[2] = 0x80 | ((c >> 6) & 0x3F); o[3] = 0x80 | (c & 0x3F);
    return 4;
}

static int get(PyObject *o, Py_buffer *v, int writable, Py_ssize_t item, const char *what) {
    if (PyObject_GetBuffer(o, v, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (v->len % item) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zd-byte items", what, v->len, item);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* ---- the model: merge table, byte tokens, and characters merged ahead ---- */

typedef struct {
    uint64_t *table, mask;
    int32_t byte_ids[256];
    uint32_t *min_left, *min_right;  /* per token id: the lowest rank of a merge taking it on the left / right */
    Py_ssize_t vocab;
    int32_t (*ahead)[4];  /* per BMP code point: [0] 0 not yet worked out, -1 bytes, 1..3 tokens in [1..3] */
} Model;

static void model_free(PyObject *capsule) {
    Model *m = PyCapsule_GetPointer(capsule, "tifaforge._bpe.Model");
    if (m) {
        free(m->table); free(m->min_left); free(m->min_right); free(m->ahead); free(m);
    }
}

static inline uint32_t min_rank(const uint32_t *a, Py_ssize_t vocab, int32_t id) {
    return id >= 0 && id < vocab ? a[id] : 0;  /* an id outside the merges' range: treated as unsafe */
}

/* Work out whether code point cp (BMP) can start a word as tokens: its bytes merged alone (the same
 * leftmost-lowest-rank rule), noting every state its first and its last symbol pass through and the
 * highest rank used; it qualifies if no merge takes one of those edge states with an outside partner
 * at a rank up to that. Such a merge is the only way its neighbours could change how it merges. */
static void premerge(Model *M, uint32_t cp) {
    uint8_t b[4];
    int32_t sym[4], edge_first[4], edge_last[4];
    int n = (int)utf8(cp, b), m = n, nf = 0, nl = 0;
    int64_t highest = -1;
    for (int i = 0; i < n; i++) sym[i] = M->byte_ids[b[i]];
    edge_first[nf++] = sym[0];
    edge_last[nl++] = sym[m - 1];
    for (;;) {
        uint32_t best = UINT32_MAX, rank;
        int32_t best_id = 0, id;
        int at = -1;
        for (int i = 0; i + 1 < m; i++)
            if (lookup(M->table, M->mask, (uint32_t)sym[i], (uint32_t)sym[i + 1], &rank, &id) && rank < best) {
                best = rank;
                best_id = id;
                at = i;
            }
        if (at < 0) break;
        if ((int64_t)best > highest) highest = best;
        sym[at] = best_id;
        for (int i = at + 1; i + 1 < m; i++) sym[i] = sym[i + 1];
        m--;
        edge_first[nf++] = sym[0];
        edge_last[nl++] = sym[m - 1];
    }
    int safe = 1;
    for (int i = 0; i < nf; i++) safe &= (int64_t)min_rank(M->min_right, M->vocab, edge_first[i]) > highest;
    for (int i = 0; i < nl; i++) safe &= (int64_t)min_rank(M->min_left, M->vocab, edge_last[i]) > highest;
    int32_t *entry = M->ahead[cp];
    for (int i = 0; i < m; i++) entry[1 + i] = sym[i];
    entry[0] = safe ? m : -1;
}

/* A word's starting symbols: characters merged ahead where they qualify, else their bytes. */
static Py_ssize_t start_symbols(Model *M, const uint32_t *t, Py_ssize_t n, int32_t *init) {
    Py_ssize_t k = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        uint32_t cp = t[j];
        if (cp >= 0x80 && cp < 0x10000) {
            int32_t *entry = M->ahead[cp];
            if (entry[0] == 0) premerge(M, cp);
            if (entry[0] > 0) {
                for (int i = 1; i <= entry[0]; i++) init[k++] = entry[i];
                continue;
            }
        }
        uint8_t b[4];
        Py_ssize_t nb = utf8(cp, b);
        for (Py_ssize_t i = 0; i < nb; i++) init[k++] = M->byte_ids[b[i]];
    }
    return k;
}

static PyObject *py_model(PyObject *self, PyObject *args) {
    PyObject *lo, *ro, *no, *bo;
    if (!PyArg_ParseTuple(args, "OOOO", &lo, &ro, &no, &bo)) return NULL;
    Py_buffer l, r, n, b;
    if (get(lo, &l, 0, 4, "left")) return NULL;
    if (get(ro, &r, 0, 4, "right")) { PyBuffer_Release(&l); return NULL; }
    if (get(no, &n, 0, 4, "new")) { PyBuffer_Release(&l); PyBuffer_Release(&r); return NULL; }
    if (get(bo, &b, 0, 4, "byte_ids")) { PyBuffer_Release(&l); PyBuffer_Release(&r); PyBuffer_Release(&n); return NULL; }
    PyObject *result = NULL;
    Model *M = NULL;
    Py_ssize_t m = l.len / 4;
    const int32_t *L = l.buf, *R = r.buf, *N = n.buf, *B = b.buf;
    if (r.len / 4 != m || n.len / 4 != m || b.len != 256 * 4) {
        PyErr_SetString(PyExc_ValueError, "model: left, right and new need one id per merge, byte_ids 256 ids");
        goto done;
    }
    int32_t top = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (L[i] < 0 || R[i] < 0 || N[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "model: token ids must not be negative");
            goto done;
        }
        top = L[i] > top ? L[i] : top;
        top = R[i] > top ? R[i] : top;
        top = N[i] > top ? N[i] : top;
    }
    for (int i = 0; i < 256; i++) top = B[i] > top ? B[i] : top;
    Py_ssize_t size = 16;
    while (size < 2 * m) size *= 2;
    if (!(M = calloc(1, sizeof(Model))) || !(M->table = malloc(2 * size * sizeof(uint64_t)))
        || !(M->min_left = malloc((top + 1) * sizeof(uint32_t))) || !(M->min_right = malloc((top + 1) * sizeof(uint32_t)))
        || !(M->ahead = calloc(0x10000, sizeof(*M->ahead)))) {
        PyErr_NoMemory();
        goto done;
    }
    M->mask = (uint64_t)size - 1;
    M->vocab = top + 1;
    memcpy(M->byte_ids, B, sizeof(M->byte_ids));
    for (Py_ssize_t i = 0; i < size; i++) M->table[2 * i] = EMPTY_KEY;
    for (Py_ssize_t i = 0; i <= top; i++) M->min_left[i] = M->min_right[i] = UINT32_MAX;
    for (Py_ssize_t i = 0; i < m; i++) {  /* a pair listed twice keeps its last rank, as HF's map does */
        uint64_t key = ((uint64_t)(uint32_t)L[i] << 32) | (uint32_t)R[i], s = slot_of(key, M->mask);
        while (M->table[2 * s] != EMPTY_KEY && M->table[2 * s] != key) s = (s + 1) & M->mask;
        M->table[2 * s] = key;
        M->table[2 * s + 1] = ((uint64_t)i << 32) | (uint32_t)N[i];
        if ((uint32_t)i < M->min_left[L[i]]) M->min_left[L[i]] = (uint32_t)i;
        if ((uint32_t)i < M->min_right[R[i]]) M->min_right[R[i]] = (uint32_t)i;
    }
    result = PyCapsule_New(M, "tifaforge._bpe.Model", model_free);
done:
    if (!result && M) {
        free(M->table); free(M->min_left); free(M->min_right); free(M->ahead); free(M);
    }
    PyBuffer_Release(&l); PyBuffer_Release(&r); PyBuffer_Release(&n); PyBuffer_Release(&b);
    return result;
}

/* ---- a word cache: pre-token code points -> its ids; most pre-tokens of a corpus were seen before ---- */

#define INLINE 6  /* a pre-token of up to 6 code points and 6 ids lives in its slot: one cache line per lookup */

typedef struct {
    uint64_t h;
    uint8_t key_len, tok_len;
    uint16_t unused;
    uint32_t off;               /* longer ones: key then ids in `spill`, from here */
    uint32_t key[INLINE];
    int32_t tok[INLINE];
} Entry;                        /* 64 bytes */

typedef struct {
    Entry *table;  /* open addressing; h == 0 marks an empty slot */
    uint32_t *spill;
    Py_ssize_t size, used, spill_used, spill_cap;
} Cache;

#define CACHE_SLOTS (1 << 18)
#define CACHE_MAX_LEN 64  /* longer pre-tokens rarely repeat: not cached */

static void cache_free(PyObject *capsule) {
    Cache *c = PyCapsule_GetPointer(capsule, "tifaforge._bpe.Cache");
    if (c) {
        free(c->table); free(c->spill); free(c);
    }
}

static void cache_clear(Cache *c) {
    memset(c->table, 0, c->size * sizeof(Entry));
    c->used = c->spill_used = 0;
}

static inline uint64_t hash_codes(const uint32_t *t, Py_ssize_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= t[i];
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    return h ? h : 1;
}

static inline const uint32_t *entry_key(const Cache *c, const Entry *e) {
    return e->key_len <= INLINE && e->tok_len <= INLINE ? e->key : c->spill + e->off;
}

static inline const int32_t *entry_ids(const Cache *c, const Entry *e) {
    return e->key_len <= INLINE && e->tok_len <= INLINE ? e->tok : (const int32_t *)(c->spill + e->off + e->key_len);
}

/* The cached ids of t[0..n) (count in *len), or NULL with *slot where to insert. */
static inline const int32_t *cache_get(const Cache *c, const uint32_t *t, Py_ssize_t n, uint64_t h, Py_ssize_t *slot,
                                       Py_ssize_t *len) {
    Py_ssize_t mask = c->size - 1, s = (Py_ssize_t)(h & (uint64_t)mask);
    for (;;) {
        const Entry *e = &c->table[s];
        if (e->h == 0) {
            *slot = s;
            return NULL;
        }
        if (e->h == h && e->key_len == n && memcmp(entry_key(c, e), t, n * sizeof(uint32_t)) == 0) {
            *len = e->tok_len;
            return entry_ids(c, e);
        }
        s = (s + 1) & mask;
    }
}

static inline void cache_put(Cache *c, const uint32_t *t, Py_ssize_t n, uint64_t h, Py_ssize_t slot, const int32_t *ids,
                             Py_ssize_t k) {
    int spill = n > INLINE || k > INLINE;
    if (k > 255 || (spill && n + k > c->spill_cap)) return;  /* not cached (k > 255: 4-byte characters) */
    if (2 * (c->used + 1) > c->size || (spill && c->spill_used + n + k > c->spill_cap)) {
        cache_clear(c);  /* full: start again (memory stays bounded) */
        Py_ssize_t len;
        cache_get(c, t, n, h, &slot, &len);
    }
    Entry *e = &c->table[slot];
    e->h = h;
    e->key_len = (uint8_t)n;
    e->tok_len = (uint8_t)k;
    if (spill) {
        e->off = (uint32_t)c->spill_used;
        memcpy(c->spill + c->spill_used, t, n * sizeof(uint32_t));
        memcpy(c->spill + c->spill_used + n, ids, k * sizeof(int32_t));
        c->spill_used += n + k;
    } else {
        memcpy(e->key, t, n * sizeof(uint32_t));
        memcpy(e->tok, ids, k * sizeof(int32_t));
    }
    c->used++;
}

static PyObject *py_cache(PyObject *self, PyObject *args) {
    Py_ssize_t slots = CACHE_SLOTS;
    if (!PyArg_ParseTuple(args, "|n", &slots)) return NULL;
    if (slots < 8 || (slots & (slots - 1))) {
        PyErr_SetString(PyExc_ValueError, "cache: slots must be a power of 2, at least 8");
        return NULL;
    }
    Cache *c = calloc(1, sizeof(Cache));
    if (!c) return PyErr_NoMemory();
    c->size = slots;
    c->spill_cap = 4 * slots;
    c->table = aligned_alloc(64, c->size * sizeof(Entry));
    c->spill = malloc(c->spill_cap * sizeof(uint32_t));
    if (!c->table || !c->spill) {
        free(c->table); free(c->spill); free(c);
        return PyErr_NoMemory();
    }
    memset(c->table, 0, c->size * sizeof(Entry));
    PyObject *capsule = PyCapsule_New(c, "tifaforge._bpe.Cache", cache_free);
    if (!capsule) {
        free(c->table); free(c->spill); free(c);
    }
    return capsule;
}

/* ---- Python bindings ---- */

static int check_texts(const Py_buffer *codes, const Py_buffer *ends, const Py_buffer *cls) {
    const int64_t *E = ends->buf;
    Py_ssize_t t = ends->len / 8, n = codes->len / 4, at = 0;
    if (cls->len != 0x110000) {
        PyErr_SetString(PyExc_ValueError, "cls: must have 0x110000 entries");
        return -1;
    }
    for (Py_ssize_t i = 0; i < t; i++) {
        if (E[i] < at || E[i] > n) {
            PyErr_SetString(PyExc_ValueError, "ends: must rise and stay within codes");
            return -1;
        }
        at = E[i];
    }
    return 0;
}

static PyObject *py_split(PyObject *self, PyObject *args) {
    PyObject *co, *eo, *clo, *oo;
    int mode;
    if (!PyArg_ParseTuple(args, "OOOiO", &co, &eo, &clo, &mode, &oo)) return NULL;
    Py_buffer codes, ends, cls, out;
    if (get(co, &codes, 0, 4, "codes")) return NULL;
    if (get(eo, &ends, 0, 8, "ends")) { PyBuffer_Release(&codes); return NULL; }
    if (get(clo, &cls, 0, 1, "cls")) { PyBuffer_Release(&codes); PyBuffer_Release(&ends); return NULL; }
    if (get(oo, &out, 1, 8, "out_ends")) {
        PyBuffer_Release(&codes); PyBuffer_Release(&ends); PyBuffer_Release(&cls);
        return NULL;
    }
    PyObject *result = NULL;
    if (check_texts(&codes, &ends, &cls) == 0) {
        if (out.len / 8 < codes.len / 4) {
            PyErr_SetString(PyExc_ValueError, "out_ends: needs one slot per code point");
        } else {
            Classes c = {cls.buf};
            const uint32_t *t = codes.buf;
            const int64_t *E = ends.buf;
            int64_t *O = out.buf;
            Py_ssize_t k = 0, pos = 0;
            for (Py_ssize_t i = 0; i < ends.len / 8; i++) {
                for (Py_ssize_t e = E[i]; pos < e;) O[k++] = pos = piece_end(&c, t, pos, e, mode);
            }
            result = PyLong_FromSsize_t(k);
        }
    }
    PyBuffer_Release(&codes); PyBuffer_Release(&ends); PyBuffer_Release(&cls); PyBuffer_Release(&out);
    return result;
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    PyObject *co, *eo, *clo, *mo, *oo, *oeo, *cache_obj;
    int mode;
    if (!PyArg_ParseTuple(args, "OOOOiOOO", &co, &eo, &clo, &mo, &mode, &oo, &oeo, &cache_obj)) return NULL;
    Model *M = PyCapsule_GetPointer(mo, "tifaforge._bpe.Model");
    if (!M) return NULL;
    Cache *cache = NULL;
    if (cache_obj != Py_None && !(cache = PyCapsule_GetPointer(cache_obj, "tifaforge._bpe.Cache"))) return NULL;
    Py_buffer b[5];
    PyObject *objs[5] = {co, eo, clo, oo, oeo};
    const Py_ssize_t items[5] = {4, 8, 1, 4, 8};
    const int writable[5] = {0, 0, 0, 1, 1};
    const char *names[5] = {"codes", "ends", "cls", "out", "out_ends"};
    int got = 0;
    PyObject *result = NULL;
    for (; got < 5; got++)
        if (get(objs[got], &b[got], writable[got], items[got], names[got])) goto done;
    if (check_texts(&b[0], &b[1], &b[2])) goto done;
    Py_ssize_t ntexts = b[1].len / 8;
    if (b[4].len / 8 < ntexts) {
        PyErr_SetString(PyExc_ValueError, "out_ends: needs a slot per text");
        goto done;
    }
    {
        Classes c = {b[2].buf};
        const uint32_t *t = b[0].buf;
        const int64_t *E = b[1].buf;
        int32_t *out = b[3].buf;
        int64_t *out_ends = b[4].buf;
        Py_ssize_t room = b[3].len / 4, k = 0, pos = 0;
        Scratch s = {0};
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < ntexts && !failed; i++) {
            Py_ssize_t e = E[i];
            while (pos < e) {
                Py_ssize_t end = piece_end(&c, t, pos, e, mode), n = 0, slot = -1, len;
                uint64_t h = 0;
                if (cache && end - pos <= CACHE_MAX_LEN) {
                    h = hash_codes(t + pos, end - pos);
                    const int32_t *hit = cache_get(cache, t + pos, end - pos, h, &slot, &len);
                    if (hit) {
                        if (k + len > room) { failed = 2; break; }
                        memcpy(out + k, hit, len * sizeof(int32_t));
                        k += len;
                        pos = end;
                        continue;
                    }
                }
                if (4 * (end - pos) > s.init_cap) {
                    Py_ssize_t cap = 4 * (end - pos) > 2 * s.init_cap ? 4 * (end - pos) : 2 * s.init_cap;
                    int32_t *grown = realloc(s.init, cap * sizeof(int32_t));
                    if (!grown) { failed = 1; break; }
                    s.init = grown;
                    s.init_cap = cap;
                }
                n = start_symbols(M, t + pos, end - pos, s.init);
                if (k + n > room) { failed = 2; break; }
                if (grow(&s, n)) { failed = 1; break; }
                Py_ssize_t got = bpe_word(&s, s.init, n, M->table, M->mask, out + k);
                if (slot >= 0) cache_put(cache, t + pos, end - pos, h, slot, out + k, got);
                k += got;
                pos = end;
            }
            out_ends[i] = k;
        }
        Py_END_ALLOW_THREADS
        free(s.sym); free(s.prev); free(s.next); free(s.alive); free(s.heap); free(s.init);
        if (failed == 1) PyErr_NoMemory();
        else if (failed == 2) PyErr_SetString(PyExc_ValueError, "out: needs room for one token per UTF-8 byte");
        else result = PyLong_FromSsize_t(k);
    }
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return result;
}

/* One-permutation MinHash of a text, exactly novels.signature's numpy definition: the code points for
 * which word[cp] is set, a polynomial hash (x 1000003, mod 2^64) of every run of k of them (of all of
 * them when fewer), MurmurHash3's finaliser, bin = hash mod num_perm, the smallest high 32 bits per
 * bin, empty bins filled by rotation from the next filled bin. */

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    return h ^ (h >> 33);
}

static PyObject *py_signature(PyObject *self, PyObject *args) {
    PyObject *co, *wo, *oo;
    int k;
    if (!PyArg_ParseTuple(args, "OOiO", &co, &wo, &k, &oo)) return NULL;
    Py_buffer codes, word, out;
    if (get(co, &codes, 0, 4, "codes")) return NULL;
    if (get(wo, &word, 0, 1, "word")) { PyBuffer_Release(&codes); return NULL; }
    if (get(oo, &out, 1, 4, "out")) { PyBuffer_Release(&codes); PyBuffer_Release(&word); return NULL; }
    PyObject *result = NULL;
    Py_ssize_t n = codes.len / 4, perm = out.len / 4;
    uint64_t *sig = NULL, *ring = NULL;
    if (word.len != 0x110000 || k < 1 || perm < 1) {
        PyErr_SetString(PyExc_ValueError, "signature: word needs 0x110000 entries, k and num_perm at least 1");
        goto done;
    }
    sig = malloc(perm * sizeof(uint64_t));
    ring = malloc(k * sizeof(uint64_t));
    if (!sig || !ring) { PyErr_NoMemory(); goto done; }
    {
        const uint32_t *t = codes.buf;
        const uint8_t *w = word.buf;
        uint32_t *o = out.buf;
        const uint64_t EMPTY = 1ULL << 32, P = 1000003ULL;
        uint64_t pk = 1;  /* P^(k-1): to drop the oldest of the k */
        for (int j = 1; j < k; j++) pk *= P;
        for (Py_ssize_t i = 0; i < perm; i++) sig[i] = EMPTY;
        Py_ssize_t m = 0, at = 0;  /* word characters seen; the ring's oldest slot */
        uint64_t h = 0, bins = (uint64_t)perm, pow2 = (bins & (bins - 1)) == 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t cp = t[i];
            if (cp >= 0x110000 || !w[cp]) continue;
            if (m >= k) h -= ring[at] * pk;
            h = h * P + cp;
            ring[at] = cp;
            at = at + 1 == k ? 0 : at + 1;
            m++;
            if (m >= k) {
                uint64_t x = mix64(h);
                Py_ssize_t b = (Py_ssize_t)(pow2 ? x & (bins - 1) : x % bins);
                if ((x >> 32) < sig[b]) sig[b] = x >> 32;
            }
        }
        if (m > 0 && m < k) {  /* fewer than k: one hash of them all */
            uint64_t x = mix64(h);
            Py_ssize_t b = (Py_ssize_t)(x % (uint64_t)perm);
            sig[b] = x >> 32;
        }
        Py_END_ALLOW_THREADS
        if (m == 0) {
            memset(o, 0, perm * 4);
        } else {
            for (Py_ssize_t e = 0; e < perm; e++) {
                if (sig[e] != EMPTY) { o[e] = (uint32_t)sig[e]; continue; }
                Py_ssize_t src = e;
                while (sig[src] == EMPTY) src = (src + 1) % perm;  /* some bin is filled */
                uint64_t distance = (uint64_t)((src - e + perm) % perm);
                o[e] = (uint32_t)(mix64(sig[src] + distance * EMPTY) >> 32);
            }
        }
        result = Py_None;
        Py_INCREF(result);
    }
done:
    free(sig);
    free(ring);
    PyBuffer_Release(&codes); PyBuffer_Release(&word); PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"model", py_model, METH_VARARGS, "model(left, right, new, byte_ids) -> a BPE model for encode"},
    {"split", py_split, METH_VARARGS, "split(codes, ends, cls, mode, out_ends) -> pre-token count"},
    {"encode", py_encode, METH_VARARGS,
     "encode(codes, ends, cls, model, mode, out, out_ends, cache) -> tokens"},
    {"signature", py_signature, METH_VARARGS, "signature(codes, word, k, out): one-permutation MinHash into out"},
    {"cache", py_cache, METH_VARARGS, "cache(slots=2**18) -> a word cache for encode (64 bytes a slot, bounded)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe", "Byte-level BPE kernel for the novel ingest.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__bpe(void) { return PyModule_Create(&module); }
