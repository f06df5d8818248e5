/* The C ABI from C: a chat with a token callback, history, rollback, clear, forget, fork,
 * slot norms, a conflict between two handles, cancellation, error codes, and a cap of one
 * resident session (the handles take turns holding the state). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lm2.h"

static int failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, \
              __LINE__, #cond, lm2_last_error());                            \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

typedef struct {
  char text[8192];
  size_t len;
  int calls;
  int cancel_after;
} sink;

static int on_token(const char* text, size_t length, void* user) {
  sink* s = (sink*)user;
  if (s->len + length < sizeof s->text) {
    memcpy(s->text + s->len, text, length);
    s->len += length;
    s->text[s->len] = '\0';
  }
  ++s->calls;
  return s->cancel_after > 0 && s->calls >= s->cancel_after;
}

int main(void) {
  const char* src = getenv("LM2_SOURCE_DIR");
  char model[4096], dir[] = "/tmp/lm2-c-api-XXXXXX", store[4200], keys[4200], cmd[4300];
  snprintf(model, sizeof model, "%s/tests/data/models/tiny-lm2", src ? src : ".");
  if (!mkdtemp(dir)) return 2;
  snprintf(store, sizeof store, "%s/store", dir);
  snprintf(keys, sizeof keys, "%s/keys", dir);

  CHECK(strcmp(lm2_code_name(LM2_CONFLICT), "Conflict") == 0);
  CHECK(lm2_create_key_file(keys) == LM2_OK);

  lm2_engine_options eo;
  lm2_engine_options_init(&eo);
  CHECK(eo.max_resident_sessions == 0);
  eo.max_resident_sessions = 1;
  eo.model_dir = "/nonexistent-model";
  eo.store_path = store;
  eo.key_file = keys;
  eo.sync_commits = 0;
  lm2_engine* e = NULL;
  CHECK(lm2_engine_open(&eo, &e) == LM2_NOT_FOUND);
  CHECK(e == NULL);
  CHECK(strlen(lm2_last_error()) > 0);
  eo.model_dir = model;
  CHECK(lm2_engine_open(&eo, &e) == LM2_OK);
  if (e == NULL) return 1;
  size_t layers = 0, slots = 0;
  lm2_engine_memory_shape(e, &layers, &slots);
  CHECK(layers == 3 && slots == 16);

  lm2_session* s = NULL;
  CHECK(lm2_session_open(e, "t", "missing", 0, &s) == LM2_NOT_FOUND);
  CHECK(lm2_session_open(e, "t", "s", 1, &s) == LM2_OK);
  lm2_chat_options co;
  lm2_chat_options_init(&co);
  co.max_tokens = 8;
  sink out;
  memset(&out, 0, sizeof out);
  lm2_chat_result r;
  CHECK(lm2_session_chat(s, "Mary went to the kitchen.", &co, on_token, &out, &r) == LM2_OK);
  CHECK(r.version == 1);
  CHECK(r.text != NULL && strcmp(r.text, out.text) == 0);
  CHECK(r.reply_tokens >= 1);
  lm2_chat_result_free(&r);
  CHECK(lm2_session_chat(s, "John picked up the apple.", &co, NULL, NULL, &r) == LM2_OK);
  lm2_chat_result_free(&r);
  CHECK(lm2_session_chat(s, "", &co, NULL, NULL, &r) == LM2_INVALID_ARGUMENT);
  CHECK(r.text == NULL);

  /* Cancellation from the callback: nothing committed. */
  co.max_tokens = 32;
  memset(&out, 0, sizeof out);
  out.cancel_after = 1;
  int rc = lm2_session_chat(s, "Where is Mary?", &co, on_token, &out, &r);
  CHECK(out.calls == 0 || rc == LM2_CANCELLED);
  CHECK(out.calls == 0 || lm2_session_head(s) == 2);
  lm2_chat_result_free(&r);
  co.max_tokens = 8;

  lm2_version* h = NULL;
  size_t n = 0;
  CHECK(lm2_session_history(s, &h, &n) == LM2_OK);
  CHECK(n == lm2_session_head(s));
  CHECK(n >= 2 && strcmp(h[0].kind, "turn") == 0 && strcmp(h[0].preview, "Mary went to the kitchen.") == 0);
  CHECK(n >= 2 && h[n - 1].is_head == 1);
  lm2_history_free(h, n);

  float norms[3 * 16];
  CHECK(lm2_session_slot_norms(s, norms, 3) == LM2_OUT_OF_RANGE);
  CHECK(lm2_session_slot_norms(s, norms, 48) == LM2_OK);

  /* Two handles: the stale one gets Conflict, reload + retry works. */
  lm2_session* s2 = NULL;
  CHECK(lm2_session_open(e, "t", "s", 1, &s2) == LM2_OK);
  const uint64_t head = lm2_session_head(s);
  CHECK(lm2_session_chat(s2, "from the second handle", &co, NULL, NULL, &r) == LM2_OK);
  lm2_chat_result_free(&r);
  CHECK(lm2_session_chat(s, "from the first handle", &co, NULL, NULL, &r) == LM2_CONFLICT);
  CHECK(lm2_session_head(s) == head);
  CHECK(lm2_session_reload(s) == LM2_OK);
  CHECK(lm2_session_chat(s, "from the first handle", &co, NULL, NULL, &r) == LM2_OK);
  CHECK(r.version == head + 2);
  lm2_chat_result_free(&r);
  lm2_session_close(s2);

  CHECK(lm2_session_rollback(s, 1) == LM2_OK);
  CHECK(lm2_session_head(s) == 1);
  CHECK(lm2_session_rollback(s, 99) == LM2_NOT_FOUND);
  int32_t layer = 1;
  int64_t slot_ids[2] = {2, 5};
  CHECK(lm2_session_clear(s, &layer, 1, slot_ids, 2) == LM2_OK);
  int32_t bad_layer = 9;
  CHECK(lm2_session_clear(s, &bad_layer, 1, NULL, 0) == LM2_INVALID_ARGUMENT);
  CHECK(lm2_session_chat(s, "The cat sleeps.", &co, NULL, NULL, &r) == LM2_OK);
  lm2_chat_result_free(&r);
  CHECK(lm2_session_forget_turn(s, 1) == LM2_OK);
  CHECK(lm2_session_forget_turn(s, 1) == LM2_FAILED_PRECONDITION);

  lm2_session* f = NULL;
  CHECK(lm2_session_fork(s, 1, "branch", NULL, &f) == LM2_OK);
  CHECK(f != NULL && lm2_session_head(f) == 1);
  lm2_session* f2 = NULL;
  CHECK(lm2_session_fork(s, 1, "branch", NULL, &f2) == LM2_ALREADY_EXISTS);
  CHECK(f2 == NULL);
  lm2_session_close(f);

  lm2_engine_stats stats;
  lm2_engine_get_stats(e, &stats);
  CHECK(stats.resident_sessions <= 1);
  CHECK(stats.evictions > 0);
  CHECK(stats.decode_batches == 0 && stats.decode_steps == 0);  /* the CPU backend runs steps alone */

  CHECK(lm2_session_erase(s) == LM2_OK);
  CHECK(lm2_session_chat(s, "after erase", &co, NULL, NULL, &r) == LM2_NOT_FOUND);
  lm2_session_close(s);
  CHECK(lm2_engine_erase_tenant(e, "t") == LM2_OK);
  lm2_engine_close(e);

  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  if (failures == 0) printf("c_api_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
