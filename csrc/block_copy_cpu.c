/* CPU block copies for flexkv_store.transfer: paged KV blocks <-> a contiguous chunk.
 *
 * Plain C (no torch headers), built at run time with cffi in API mode by
 * flexkv_store/transfer/_cpu.py, which holds the matching cdef; cffi releases the GIL for
 * the duration of each call. Python validates every argument first (shapes, dtypes, block
 * ids in range), so these functions trust their inputs.
 *
 * The chunk is the planes (one layer's K or V, or its MLA cache) back to back, each holding
 * `num_ids` blocks of `block_nbytes` bytes in the order of `ids`. Block `b` of plane `q`
 * lives at `planes[q] + b * stride`. Gather copies blocks into the chunk, scatter the chunk
 * into the blocks. Work is split by chunk bytes, so it balances whatever the shape.
 *
 * Threads come from OpenMP. Built with -fopenmp, the module needs `libgomp.so.1`, and in a
 * process that has imported torch (whose wheels ship a libgomp with that soname) the loader
 * reuses torch's copy: the copies run on torch's own intra-op workers, which are still
 * spinning hot after the engine's last torch op. Threads of a second pool would compete with
 * those spinning workers for the cores (on 2 cores that halved the gain).
 */
#include <omp.h>
#include <stddef.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* Copy all `num_planes * num_ids` blocks with up to `num_threads` threads (the caller's
 * included); returns the number of threads that ran. The cdef in _cpu.py repeats this. */
int fkv_block_copy(const uint64_t *planes, size_t num_planes, const int64_t *ids,
                   size_t num_ids, size_t block_nbytes, size_t stride, uint64_t chunk,
                   int scatter, int num_threads);

/* Copies of at least this many bytes in all write around the caches (streaming stores). A
 * plain store first reads the destination line into the cache (read for ownership), so a
 * copy moves three bytes per byte copied; streaming stores move two, as a large memcpy does
 * (glibc streams one copy only above about 3/4 of the cache share of a thread, and a block is
 * far below that, so memcpy block by block paid the extra read: 0.5x of a contiguous copy).
 * Below this size the destination would stay in the cache for its next reader. */
#define FKV_STREAM_MIN (4u << 20)

/* memcpy with streaming stores for the 64-byte lines of `dst` (SSE2, every x86-64); plain
 * memcpy elsewhere. The caller fences (fkv_run_pieces) before the copy is handed on. */
static void fkv_copy(char *dst, const char *src, size_t n, int stream)
{
#if defined(__SSE2__)
    if (stream && n >= 256) {
        size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        size_t body = n & ~(size_t)63;
        for (size_t i = 0; i < body; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        memcpy(dst + body, src + body, n - body);
        return;
    }
#endif
    (void)stream;
    memcpy(dst, src, n);
}

static void fkv_fence(int stream)
{
#if defined(__SSE2__)
    if (stream)
        _mm_sfence();
#endif
    (void)stream;
}

/* Copy chunk bytes [begin, end) from/to their blocks. */
static void fkv_block_copy_range(const uint64_t *planes, const int64_t *ids, size_t num_ids,
                          size_t block_nbytes, size_t stride, uint64_t chunk, int scatter,
                          int stream, size_t begin, size_t end)
{
    if (begin >= end || block_nbytes == 0 || num_ids == 0)
        return;
    size_t plane_nbytes = num_ids * block_nbytes;
    size_t q = begin / plane_nbytes;
    size_t i = (begin % plane_nbytes) / block_nbytes;
    size_t off = begin % block_nbytes;
    char *c = (char *)(uintptr_t)chunk + begin;
    size_t left = end - begin;
    while (left > 0) {
        size_t n = block_nbytes - off;
        if (n > left)
            n = left;
        char *blk = (char *)(uintptr_t)planes[q] + (size_t)ids[i] * stride + off;
        if (scatter)
            fkv_copy(blk, c, n, stream);
        else
            fkv_copy(c, blk, n, stream);
        c += n;
        left -= n;
        off = 0;
        if (++i == num_ids) {
            i = 0;
            ++q;
        }
    }
}

/* One call's work, split into `piece`-byte pieces of the chunk that threads claim through
 * `next`. Pieces are claimed dynamically, so when a thread starts late or its core is busy
 * (a neighbour process), the others take over most of its share, where a static split would
 * leave them waiting for it. */
struct fkv_copy_job {
    const uint64_t *planes;
    const int64_t *ids;
    size_t num_ids, block_nbytes, stride;
    uint64_t chunk;
    int scatter, stream;
    size_t total, piece;
    size_t next;
};

static void fkv_run_pieces(struct fkv_copy_job *job)
{
    for (;;) {
        size_t k = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        size_t begin = k * job->piece;
        if (begin >= job->total) {
            fkv_fence(job->stream); /* this thread's stores are seen before the region ends */
            return;
        }
        size_t end = job->total - begin > job->piece ? begin + job->piece : job->total;
        fkv_block_copy_range(job->planes, job->ids, job->num_ids, job->block_nbytes, job->stride,
                             job->chunk, job->scatter, job->stream, begin, end);
    }
}

/* Pieces are whole pages, so no two threads write one cache line, and about this many per
 * thread: small enough to balance, large enough that claiming one costs nothing. */
#define FKV_PAGE 4096
#define FKV_PIECES_PER_THREAD 16
#define FKV_MIN_PIECE (64 * 1024)

/* libgomp cannot run a parallel region in a forked child of a process that has used one (its
 * worker threads are gone; torch's own CPU ops hang there too): such a child copies on its
 * one thread. */
static pid_t fkv_owner_pid;

__attribute__((constructor)) static void fkv_remember_pid(void)
{
    fkv_owner_pid = getpid();
}

int fkv_block_copy(const uint64_t *planes, size_t num_planes, const int64_t *ids,
                   size_t num_ids, size_t block_nbytes, size_t stride, uint64_t chunk,
                   int scatter, int num_threads)
{
    size_t total = num_planes * num_ids * block_nbytes;
    if (num_threads < 1)
        num_threads = 1;
    size_t piece = total / ((size_t)num_threads * FKV_PIECES_PER_THREAD);
    piece -= piece % FKV_PAGE;
    if (piece < FKV_MIN_PIECE)
        piece = FKV_MIN_PIECE;
    int stream = total >= FKV_STREAM_MIN;
    if (num_threads == 1 || total <= piece || getpid() != fkv_owner_pid) {
        fkv_block_copy_range(planes, ids, num_ids, block_nbytes, stride, chunk, scatter, stream,
                             0, total);
        fkv_fence(stream);
        return 1;
    }
    struct fkv_copy_job job = {planes, ids, num_ids, block_nbytes, stride, chunk, scatter,
                               stream, total, piece, 0};
    int ran = 1;
#pragma omp parallel num_threads(num_threads)
    {
        fkv_run_pieces(&job);
#pragma omp master
        ran = omp_get_num_threads();
    }
    return ran;
}
