// Tokenizer: DIR/tokenizer.model (sentencepiece) plus the chat template of DIR.
//
// Piece ids every lm2 tokenizer has (tools/lm2ref/tokenizer.py): 0 <unk>, 1 <s> (BOS),
// 2 </s> (EOS), 3 <pad>, then <|user|>, <|assistant|>, <|end|> as user-defined symbols
// (each always one id, also inside Encode's input), and byte fallback for any text.
//
// Ownership: owns the sentencepiece processor. Thread-safety: every const method may be
// called from many threads at once (sentencepiece's encode/decode are const and
// reentrant); a StreamDecoder belongs to one stream and is not thread-safe. Cost: Open
// parses the model (milliseconds for a 32k vocabulary); Encode/Decode are linear.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lm2/core/status.h"
#include "lm2/runtime/chat_template.h"

namespace lm2::runtime {

class Tokenizer;

// Turns a stream of ids, one at a time, into text: each Push returns the UTF-8 text that
// became complete with that id, never part of a multi-byte character (byte-fallback pieces
// of one character are held until the character is whole). The concatenation of every
// Push and the final Flush equals Tokenizer::Decode of all the ids. Cost: O(1) amortised
// per id. References the Tokenizer, which must outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer) : tok_(&tokenizer) {}
  // InvalidArgument for an id outside [0, vocab_size).
  Result<std::string> Push(int32_t id);
  // Text still held (an incomplete character at the end: decoded as sentencepiece does,
  // U+FFFD per invalid byte). Resets the stream.
  std::string Flush();
  // Forgets everything (a new stream).
  void Reset();

 private:
  std::string DecodePending() const;
  const Tokenizer* tok_;
  std::vector<int> pending_;  // ids of the current window
  std::size_t emitted_ = 0;   // bytes of DecodePending() already returned
  bool started_ = false;      // some text was emitted: no leading-space stripping anymore
};

class Tokenizer {
 public:
  // Reads DIR/tokenizer.model (NotFound if missing, Corruption if unreadable) and
  // DIR/chat_template.json (when missing: the default ChatTemplate if the tokenizer has
  // <|user|>, <|assistant|> and <|end|>, else ChatTemplate::Plain()). A template whose
  // stop strings are not single pieces is InvalidArgument.
  static Result<std::unique_ptr<Tokenizer>> Open(const std::string& model_dir);
  // A tokenizer from a .model file, with the default template.
  static Result<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Text to ids, without BOS/EOS. Control-symbol text such as "<|end|>" in `text`
  // becomes that symbol's id (sentencepiece matches user-defined symbols everywhere).
  Result<std::vector<int32_t>> Encode(std::string_view text) const;
  // Ids to text; control ids (BOS, EOS, pad) decode to nothing. InvalidArgument for an
  // id outside [0, vocab_size).
  Result<std::string> Decode(const std::vector<int32_t>& ids) const;
  StreamDecoder NewStreamDecoder() const { return StreamDecoder(*this); }

  int32_t vocab_size() const;
  int32_t unk_id() const;
  int32_t bos_id() const;  // -1 when the model defines none
  int32_t eos_id() const;
  int32_t pad_id() const;
  // The chat symbols' ids; -1 when the tokenizer lacks them.
  int32_t user_id() const;
  int32_t assistant_id() const;
  int32_t end_id() const;
  // The piece of an id ("▁the", "<0x0A>", "<|end|>"); empty for an id out of range.
  std::string IdToPiece(int32_t id) const;
  // The id of a piece; -1 when no piece is exactly `piece`.
  int32_t PieceToId(std::string_view piece) const;
  bool IsControl(int32_t id) const;  // <s>, </s>, <pad>
  bool IsByte(int32_t id) const;     // <0xNN>

  const ChatTemplate& chat_template() const;
  // The ids of one user turn followed by the assistant prefix, ready for the model to
  // continue with its reply: [BOS if first_turn && add_bos] + Encode(RenderUserTurn(m)),
  // without the lone dummy-prefix piece sentencepiece puts before a leading control symbol.
  Result<std::vector<int32_t>> RenderUserTurn(std::string_view message, bool first_turn) const;
  // Ids whose generation ends a reply: the template's stop pieces, plus EOS.
  const std::vector<int32_t>& stop_ids() const;

 private:
  friend class StreamDecoder;
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lm2::runtime
