/* See uring_engine.h. Compiled at run time by flexkv_store/backends/_uring.py (cffi). */
#include <errno.h>
#include <stdlib.h>

#include <liburing.h>

#include "uring_engine.h"

struct fkv_ring {
    struct io_uring ring;
};

struct fkv_ring *fkv_ring_open(unsigned entries, int *err)
{
    struct fkv_ring *r = calloc(1, sizeof(*r));
    int rc;

    if (r == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    rc = io_uring_queue_init(entries, &r->ring, 0);
    if (rc < 0) {
        free(r);
        *err = -rc;
        return NULL;
    }
    *err = 0;
    return r;
}

void fkv_ring_close(struct fkv_ring *r)
{
    if (r == NULL)
        return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

int fkv_prep_readv(struct fkv_ring *r, int fd, const struct iovec *iov, unsigned nr,
                   uint64_t offset, uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_readv(sqe, fd, iov, nr, offset);
    sqe->user_data = user_data;
    return 0;
}

int fkv_prep_writev(struct fkv_ring *r, int fd, const struct iovec *iov, unsigned nr,
                    uint64_t offset, uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_writev(sqe, fd, iov, nr, offset);
    sqe->user_data = user_data;
    return 0;
}

int fkv_submit_and_wait(struct fkv_ring *r, unsigned wait_nr)
{
    return io_uring_submit_and_wait(&r->ring, wait_nr);
}

unsigned fkv_reap(struct fkv_ring *r, uint64_t *user_data, int32_t *res, unsigned max)
{
    struct io_uring_cqe *cqe;
    unsigned head;
    unsigned n = 0;

    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == max)
            break;
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return n;
}
