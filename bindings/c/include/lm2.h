/* lm2.h: the C ABI of the lm2 session SDK.
 *
 * Handles are opaque; every function that can fail returns an lm2_code (0 = LM2_OK; the
 * numbers are lm2::StatusCode's) and leaves a message for lm2_last_error() on the calling
 * thread. Strings are UTF-8, NUL-terminated; strings and arrays the library returns are
 * freed with the matching *_free function.
 *
 * Threading: an lm2_engine may be used from many threads at once; an lm2_session from one
 * thread at a time (many sessions may run at once). The token callback runs on the thread
 * that called lm2_session_chat.
 *
 *   lm2_engine_options eo; lm2_engine_options_init(&eo);
 *   eo.model_dir = "models/lm2-demo"; eo.store_path = "data/store"; eo.key_file = "data/master.key";
 *   lm2_create_key_file(eo.key_file);
 *   lm2_engine* e; if (lm2_engine_open(&eo, &e) != LM2_OK) puts(lm2_last_error());
 *   lm2_session* s; lm2_session_open(e, "alice", "main", 1, &s);
 *   lm2_chat_result r; lm2_session_chat(s, "Hello", NULL, print_token, NULL, &r);
 *   lm2_chat_result_free(&r); lm2_session_close(s); lm2_engine_close(e);
 */
#ifndef LM2_C_API_H_
#define LM2_C_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lm2_code {
  LM2_OK = 0,
  LM2_INVALID_ARGUMENT = 1,
  LM2_NOT_FOUND = 2,
  LM2_ALREADY_EXISTS = 3,
  LM2_CORRUPTION = 4,
  LM2_CONFLICT = 5,
  LM2_PERMISSION_DENIED = 6,
  LM2_FAILED_PRECONDITION = 7,
  LM2_OUT_OF_RANGE = 8,
  LM2_RESOURCE_EXHAUSTED = 9,
  LM2_UNAVAILABLE = 10,
  LM2_CANCELLED = 11,
  LM2_UNIMPLEMENTED = 12,
  LM2_IO_ERROR = 13,
  LM2_INTERNAL = 14
} lm2_code;

typedef struct lm2_engine lm2_engine;
typedef struct lm2_session lm2_session;

/* "OK", "NotFound", ... */
const char* lm2_code_name(int code);
/* The message of the last failed call on this thread ("" if none). Valid until the next
 * call on this thread. */
const char* lm2_last_error(void);

typedef enum lm2_backend { LM2_BACKEND_AUTO = 0, LM2_BACKEND_CPU = 1, LM2_BACKEND_CUDA = 2 } lm2_backend;

typedef struct lm2_engine_options {
  const char* model_dir;        /* required */
  const char* store_path;       /* required */
  const char* key_file;         /* keyring file; NULL: use key_env. Default NULL */
  const char* key_env;          /* environment variable with the keyring. Default "LM2_KEK" */
  int backend;                  /* lm2_backend. Default LM2_BACKEND_AUTO */
  int share_store;              /* other processes use the store too. Default 0 */
  int sync_commits;             /* fsync each commit. Default 1 */
  size_t max_message_bytes;     /* Default 65536 */
  /* Most sessions holding a backend state (KV cache, memory bank) at once; the least
   * recently used idle one gives its state up for another (lm2::EngineOptions::
   * max_resident_sessions). 0 = no cap. Default 0 */
  size_t max_resident_sessions;
} lm2_engine_options;

void lm2_engine_options_init(lm2_engine_options* options);
/* Writes a keyring file with a random master key (mode 0600) unless it exists. */
int lm2_create_key_file(const char* path);
int lm2_engine_open(const lm2_engine_options* options, lm2_engine** out);
void lm2_engine_close(lm2_engine* engine); /* sessions keep what they need alive */
/* Memory shape: number of memory layers and slots per layer. */
void lm2_engine_memory_shape(const lm2_engine* engine, size_t* layers, size_t* slots);

typedef struct lm2_engine_stats {
  size_t resident_sessions;       /* sessions holding a backend state now */
  uint64_t evictions;             /* states taken back from idle sessions so far */
  uint64_t decode_batches;        /* concurrent chats' decode steps run as one call (GPU) */
  uint64_t decode_steps;          /* the steps those calls ran */
  uint64_t largest_decode_batch;  /* the most steps in one call */
} lm2_engine_stats;
void lm2_engine_get_stats(const lm2_engine* engine, lm2_engine_stats* out);

int lm2_engine_erase_session(lm2_engine* engine, const char* tenant, const char* session_id);
int lm2_engine_erase_tenant(lm2_engine* engine, const char* tenant);

int lm2_session_open(lm2_engine* engine, const char* tenant, const char* session_id, int create_if_missing,
                     lm2_session** out);
void lm2_session_close(lm2_session* session);
uint64_t lm2_session_head(const lm2_session* session);
uint64_t lm2_session_turns(const lm2_session* session);

typedef struct lm2_chat_options {
  int32_t max_tokens;           /* Default 256 */
  float temperature;            /* Default 0 (greedy) */
  int32_t top_k;                /* Default 0 (off) */
  float top_p;                  /* Default 1 (off) */
  float repetition_penalty;     /* Default 1 (off) */
  uint64_t seed;                /* Default 0 */
} lm2_chat_options;
void lm2_chat_options_init(lm2_chat_options* options);

/* Receives reply text as it becomes final. Return nonzero to cancel the turn (the chat
 * then returns LM2_CANCELLED and commits nothing). */
typedef int (*lm2_token_callback)(const char* text, size_t length, void* user_data);

typedef struct lm2_chat_result {
  char* text;                   /* the reply (free with lm2_chat_result_free) */
  uint64_t version;             /* the committed version */
  int64_t prompt_tokens;
  int64_t reply_tokens;
} lm2_chat_result;

/* One turn. options and callback may be NULL. On LM2_CONFLICT call lm2_session_reload and
 * resend. On any error nothing is committed and *result is zeroed. */
int lm2_session_chat(lm2_session* session, const char* message, const lm2_chat_options* options,
                     lm2_token_callback callback, void* user_data, lm2_chat_result* result);
void lm2_chat_result_free(lm2_chat_result* result);

int lm2_session_reload(lm2_session* session);
int lm2_session_rollback(lm2_session* session, uint64_t version);
int lm2_session_forget_turn(lm2_session* session, uint64_t version);
/* Resets the given layers (NULL/0: all) and slots (NULL/0: all) to their initial value. */
int lm2_session_clear(lm2_session* session, const int32_t* layers, size_t n_layers, const int64_t* slots,
                      size_t n_slots);
/* new_tenant NULL: the same tenant. */
int lm2_session_fork(lm2_session* session, uint64_t version, const char* new_session_id, const char* new_tenant,
                     lm2_session** out);
int lm2_session_erase(lm2_session* session);

typedef struct lm2_version {
  uint64_t version;
  uint64_t parent_version;
  int64_t created_unix_ms;
  char* kind;                   /* "turn", "clear", "forget", "base" */
  char* preview;
  uint64_t turn_count;
  int is_head;
} lm2_version;
int lm2_session_history(lm2_session* session, lm2_version** versions, size_t* count);
void lm2_history_free(lm2_version* versions, size_t count);

/* Slot norms of the head memory, layer-major: layers x slots values (lm2_engine_memory_shape).
 * `capacity` is the length of `out`; OUT_OF_RANGE when too small. */
int lm2_session_slot_norms(lm2_session* session, float* out, size_t capacity);

#ifdef __cplusplus
}
#endif

#endif /* LM2_C_API_H_ */
