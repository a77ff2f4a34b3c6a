/* Thin C wrappers over liburing for flexkv_store's io_uring engine (cffi API mode).
 *
 * liburing's io_uring_prep_* helpers are static inline functions, which cffi cannot call
 * through a shared library, so these wrappers give them real symbols. The Python side
 * (flexkv_store/backends/_uring.py) feeds this header to cffi's cdef after dropping the
 * preprocessor lines, so keep it to plain declarations. Every function returns a negative
 * errno on failure, as liburing does.
 */
#include <stdint.h>
#include <sys/uio.h>

struct fkv_ring;

/* Set up a ring with `entries` submission slots; NULL with *err = errno on failure. */
struct fkv_ring *fkv_ring_open(unsigned entries, int *err);
/* Tear the ring down; the caller has reaped every completion. NULL is a no-op. */
void fkv_ring_close(struct fkv_ring *ring);
/* Queue one vectored read or write; -EBUSY when the submission queue is full. */
int fkv_prep_readv(struct fkv_ring *ring, int fd, const struct iovec *iov, unsigned nr,
                   uint64_t offset, uint64_t user_data);
int fkv_prep_writev(struct fkv_ring *ring, int fd, const struct iovec *iov, unsigned nr,
                    uint64_t offset, uint64_t user_data);
/* Submit everything queued and wait until at least `wait_nr` completions are ready. */
int fkv_submit_and_wait(struct fkv_ring *ring, unsigned wait_nr);
/* Copy up to `max` ready completions out (user data, result) and retire them. */
unsigned fkv_reap(struct fkv_ring *ring, uint64_t *user_data, int32_t *res, unsigned max);
