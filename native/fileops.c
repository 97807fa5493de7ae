/*
 * The few file operations Node's fs module lacks and the file source needs:
 * lseek(SEEK_DATA/SEEK_HOLE) to report a sparse file's real allocation, and
 * fallocate(PUNCH_HOLE / ZERO_RANGE) for TRIM and WRITE_ZEROES. And open
 * file description locks (F_OFD_GETLK / F_OFD_SETLK), for the lock bytes
 * QEMU keeps on the images it opens: a file target checks and takes them.
 *
 * Every call runs on libuv's thread pool and resolves a promise, because
 * fallocate can block on a busy file system and the event loop serves guests.
 * Errors reject with an Error carrying `code` (the errno name) and `errno`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <node_api.h>

enum op { OP_SEEK_DATA, OP_SEEK_HOLE, OP_PUNCH_HOLE, OP_ZERO_RANGE, OP_LOCK_HELD, OP_LOCK_SHARED };

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  enum op op;
  int fd;
  int64_t offset;
  int64_t length;
  int64_t result;
  int err;
} file_op;

static const char *errno_name(int e) {
  switch (e) {
  case ENXIO: return "ENXIO";
  case EOPNOTSUPP: return "EOPNOTSUPP";
  case EINVAL: return "EINVAL";
  case EBADF: return "EBADF";
  case ENOSPC: return "ENOSPC";
  case EIO: return "EIO";
  case ESPIPE: return "ESPIPE";
  case EPERM: return "EPERM";
  case EFBIG: return "EFBIG";
  case EINTR: return "EINTR";
  case EAGAIN: return "EAGAIN";
  case EACCES: return "EACCES";
  case ENOLCK: return "ENOLCK";
  case ENODEV: return "ENODEV";
  default: return "EUNKNOWN";
  }
}

static void execute(napi_env env, void *data) {
  (void)env;
  file_op *op = data;
  off_t r;
  op->err = 0;
  switch (op->op) {
  case OP_SEEK_DATA:
  case OP_SEEK_HOLE:
    r = lseek(op->fd, (off_t)op->offset, op->op == OP_SEEK_DATA ? SEEK_DATA : SEEK_HOLE);
    if (r < 0) op->err = errno; else op->result = (int64_t)r;
    break;
  case OP_PUNCH_HOLE:
  case OP_ZERO_RANGE: {
    int mode = op->op == OP_PUNCH_HOLE ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
                                       : FALLOC_FL_ZERO_RANGE;
    int rc;
    do {
      rc = fallocate(op->fd, mode, (off_t)op->offset, (off_t)op->length);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) op->err = errno; else op->result = 0;
    break;
  }
  case OP_LOCK_HELD:
  case OP_LOCK_SHARED: {
    /* HELD: would an exclusive lock on the range conflict with a lock some
     * other open file description holds? (1 yes, 0 no; our own never
     * conflict.) SHARED: take a shared (read) lock there, without waiting. */
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)op->offset;
    fl.l_len = (off_t)op->length;
    fl.l_type = op->op == OP_LOCK_HELD ? F_WRLCK : F_RDLCK;
    int rc;
    do {
      rc = fcntl(op->fd, op->op == OP_LOCK_HELD ? F_OFD_GETLK : F_OFD_SETLK, &fl);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) op->err = errno;
    else op->result = op->op == OP_LOCK_HELD ? (fl.l_type != F_UNLCK) : 0;
    break;
  }
  }
}

static void complete(napi_env env, napi_status status, void *data) {
  file_op *op = data;
  if (status != napi_ok) op->err = op->err ? op->err : EIO;
  if (op->err == 0) {
    napi_value v;
    napi_create_int64(env, op->result, &v);
    napi_resolve_deferred(env, op->deferred, v);
  } else {
    napi_value msg, code, err, errnum;
    const char *name = errno_name(op->err);
    napi_create_string_utf8(env, strerror(op->err), NAPI_AUTO_LENGTH, &msg);
    napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, msg, &err);
    napi_set_named_property(env, err, "code", code);
    napi_create_int32(env, op->err, &errnum);
    napi_set_named_property(env, err, "errno", errnum);
    napi_reject_deferred(env, op->deferred, err);
  }
  napi_delete_async_work(env, op->work);
  free(op);
}

static napi_value start(napi_env env, napi_callback_info info, enum op kind, size_t want) {
  size_t argc = 3;
  napi_value argv[3], promise, name;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "fileops: wrong number of arguments");
    return NULL;
  }
  file_op *op = calloc(1, sizeof *op);
  if (!op) {
    napi_throw_error(env, NULL, "fileops: out of memory");
    return NULL;
  }
  op->op = kind;
  int32_t fd;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &op->offset) != napi_ok ||
      (want > 2 && napi_get_value_int64(env, argv[2], &op->length) != napi_ok)) {
    free(op);
    napi_throw_type_error(env, NULL, "fileops: arguments must be numbers");
    return NULL;
  }
  op->fd = fd;
  napi_create_promise(env, &op->deferred, &promise);
  napi_create_string_utf8(env, "nbd-cbw:fileops", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, op, &op->work);
  napi_queue_async_work(env, op->work);
  return promise;
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return start(env, info, OP_SEEK_DATA, 2); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return start(env, info, OP_SEEK_HOLE, 2); }
static napi_value punch_hole(napi_env env, napi_callback_info info) { return start(env, info, OP_PUNCH_HOLE, 3); }
static napi_value zero_range(napi_env env, napi_callback_info info) { return start(env, info, OP_ZERO_RANGE, 3); }
static napi_value lock_held(napi_env env, napi_callback_info info) { return start(env, info, OP_LOCK_HELD, 3); }
static napi_value lock_shared(napi_env env, napi_callback_info info) { return start(env, info, OP_LOCK_SHARED, 3); }

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
    {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
    {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_default, NULL},
    {"lockHeld", NULL, lock_held, NULL, NULL, NULL, napi_default, NULL},
    {"lockShared", NULL, lock_shared, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
