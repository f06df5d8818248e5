// Tokenizer over sentencepiece, and the streaming decoder.
#include "lm2/runtime/tokenizer.h"

#include <filesystem>

#include <sentencepiece_processor.h>

namespace lm2::runtime {
namespace {

// Expected length of a UTF-8 sequence from its lead byte; 0 for a byte that cannot lead.
int Utf8Length(unsigned char b) {
  if (b < 0x80) return 1;
  if ((b & 0xE0) == 0xC0) return b >= 0xC2 ? 2 : 0;
  if ((b & 0xF0) == 0xE0) return 3;
  if ((b & 0xF8) == 0xF0) return b <= 0xF4 ? 4 : 0;
  return 0;
}

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  int32_t vocab = 0;
  std::vector<int16_t> byte_of;  // per id: the byte of a <0xNN> piece, or -1
  int32_t user = -1, assistant = -1, end = -1;
  // A visible piece that decodes to `anchor_text` with no leading space: decoding
  // [anchor] + ids and dropping anchor_text decodes ids as if text came before them.
  int anchor = -1;
  std::string anchor_text;
  ChatTemplate chat;
  std::vector<int32_t> stop_ids;

  bool Valid(int32_t id) const { return id >= 0 && id < vocab; }
  std::string DecodeRaw(const std::vector<int>& ids) const {
    std::string out;
    if (!sp.Decode(ids, &out).ok()) return {};
    return out;
  }
};

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Status::NotFound(path + ": no such file");
  auto impl = std::make_unique<Impl>();
  const auto st = impl->sp.Load(path);
  if (!st.ok()) return Status::Corruption(path + ": not a sentencepiece model: " + st.ToString());
  impl->vocab = impl->sp.GetPieceSize();
  impl->byte_of.assign(static_cast<std::size_t>(impl->vocab), -1);
  for (int id = 0; id < impl->vocab; ++id) {
    if (!impl->sp.IsByte(id)) continue;
    const std::string& p = impl->sp.IdToPiece(id);  // "<0xAB>"
    if (p.size() == 6 && p.rfind("<0x", 0) == 0 && p[5] == '>') {
      auto hex = [](char c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; };
      impl->byte_of[static_cast<std::size_t>(id)] = static_cast<int16_t>(hex(p[3]) * 16 + hex(p[4]));
    }
  }
  auto find = [&](const char* piece) {
    const int id = impl->sp.PieceToId(piece);
    return impl->sp.IdToPiece(id) == piece ? id : -1;
  };
  impl->user = find("<|user|>");
  impl->assistant = find("<|assistant|>");
  impl->end = find("<|end|>");
  const std::string kSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's whitespace mark
  for (int id = 0; id < impl->vocab && impl->anchor < 0; ++id) {
    if (impl->sp.IsControl(id) || impl->sp.IsUnknown(id) || impl->sp.IsByte(id) || impl->sp.IsUnused(id)) continue;
    const std::string& p = impl->sp.IdToPiece(id);
    if (p.empty() || p.rfind(kSpace, 0) == 0) continue;
    const std::string one = impl->DecodeRaw({id});
    if (!one.empty() && impl->DecodeRaw({id, id}) == one + one) {
      impl->anchor = id;
      impl->anchor_text = one;
    }
  }
  const bool chat = impl->user >= 0 && impl->assistant >= 0 && impl->end >= 0;
  impl->chat = chat ? ChatTemplate() : ChatTemplate::Plain();
  std::unique_ptr<Tokenizer> tok(new Tokenizer(std::move(impl)));
  tok->impl_->stop_ids = {};
  for (const std::string& s : tok->impl_->chat.stop) tok->impl_->stop_ids.push_back(tok->PieceToId(s));
  if (tok->eos_id() >= 0) tok->impl_->stop_ids.push_back(tok->eos_id());
  return tok;
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::Open(const std::string& model_dir) {
  LM2_ASSIGN_OR_RETURN(auto tok, FromFile(model_dir + "/tokenizer.model"));
  auto chat = ChatTemplate::Load(model_dir);
  if (chat.ok()) {
    tok->impl_->chat = std::move(chat).value();
  } else if (!chat.status().IsNotFound()) {
    return chat.status();
  }
  std::vector<int32_t> stops;
  for (const std::string& s : tok->impl_->chat.stop) {
    const int32_t id = tok->PieceToId(s);
    if (id < 0) {
      return Status::InvalidArgument(model_dir + "/chat_template.json: stop string \"" + s +
                                     "\" is not a single piece of tokenizer.model");
    }
    stops.push_back(id);
  }
  if (tok->eos_id() >= 0) stops.push_back(tok->eos_id());
  tok->impl_->stop_ids = std::move(stops);
  return tok;
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::vector<int32_t>> Tokenizer::Encode(std::string_view text) const {
  std::vector<int> ids;
  const auto st = impl_->sp.Encode(text, &ids);
  if (!st.ok()) return Status::InvalidArgument("tokenizer: cannot encode: " + st.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

Result<std::string> Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  for (int32_t id : ids) {
    if (!impl_->Valid(id)) {
      return Status::InvalidArgument("tokenizer: id " + std::to_string(id) + " outside [0, " +
                                     std::to_string(impl_->vocab) + ")");
    }
  }
  std::string out;
  const auto st = impl_->sp.Decode(std::vector<int>(ids.begin(), ids.end()), &out);
  if (!st.ok()) return Status::Internal("tokenizer: cannot decode: " + st.ToString());
  return out;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab; }
int32_t Tokenizer::unk_id() const { return impl_->sp.unk_id(); }
int32_t Tokenizer::bos_id() const { return impl_->sp.bos_id(); }
int32_t Tokenizer::eos_id() const { return impl_->sp.eos_id(); }
int32_t Tokenizer::pad_id() const { return impl_->sp.pad_id(); }
int32_t Tokenizer::user_id() const { return impl_->user; }
int32_t Tokenizer::assistant_id() const { return impl_->assistant; }
int32_t Tokenizer::end_id() const { return impl_->end; }

std::string Tokenizer::IdToPiece(int32_t id) const { return impl_->Valid(id) ? impl_->sp.IdToPiece(id) : std::string(); }

int32_t Tokenizer::PieceToId(std::string_view piece) const {
  const int id = impl_->sp.PieceToId(piece);
  return impl_->Valid(id) && impl_->sp.IdToPiece(id) == piece ? id : -1;
}

bool Tokenizer::IsControl(int32_t id) const { return impl_->Valid(id) && impl_->sp.IsControl(id); }
bool Tokenizer::IsByte(int32_t id) const { return impl_->Valid(id) && impl_->sp.IsByte(id); }
const ChatTemplate& Tokenizer::chat_template() const { return impl_->chat; }
const std::vector<int32_t>& Tokenizer::stop_ids() const { return impl_->stop_ids; }

Result<std::vector<int32_t>> Tokenizer::RenderUserTurn(std::string_view message, bool first_turn) const {
  std::vector<int32_t> out;
  if (first_turn && impl_->chat.add_bos && bos_id() >= 0) out.push_back(bos_id());
  const std::string text = impl_->chat.RenderUserTurn(message);
  LM2_ASSIGN_OR_RETURN(std::vector<int32_t> ids, Encode(text));
  // Text that starts with a control symbol gets a lone dummy-prefix piece ("▁") first;
  // the chat format has none (it is not in training text), so it is dropped.
  auto first = ids.begin();
  const bool chat_symbol_next = ids.size() > 1 && (ids[1] == user_id() || ids[1] == assistant_id() || ids[1] == end_id());
  if (chat_symbol_next && ids[0] == PieceToId("\xE2\x96\x81")) ++first;
  out.insert(out.end(), first, ids.end());
  return out;
}

// ---- StreamDecoder ---------------------------------------------------------------------

std::string StreamDecoder::DecodePending() const {
  const Tokenizer::Impl& t = *tok_->impl_;
  if (!started_ || t.anchor < 0) return t.DecodeRaw(pending_);
  std::vector<int> ids;
  ids.reserve(pending_.size() + 1);
  ids.push_back(t.anchor);
  ids.insert(ids.end(), pending_.begin(), pending_.end());
  std::string text = t.DecodeRaw(ids);
  return text.size() >= t.anchor_text.size() ? text.substr(t.anchor_text.size()) : std::string();
}

Result<std::string> StreamDecoder::Push(int32_t id) {
  const Tokenizer::Impl& t = *tok_->impl_;
  if (!t.Valid(id)) {
    return Status::InvalidArgument("tokenizer: id " + std::to_string(id) + " outside [0, " + std::to_string(t.vocab) + ")");
  }
  pending_.push_back(id);
  // Hold while the trailing byte pieces are a proper prefix of one UTF-8 character.
  std::size_t run = 0;
  while (run < pending_.size() && run < 4 && t.byte_of[static_cast<std::size_t>(pending_[pending_.size() - 1 - run])] >= 0) ++run;
  for (std::size_t back = 1; back <= run; ++back) {
    const auto b = static_cast<unsigned char>(t.byte_of[static_cast<std::size_t>(pending_[pending_.size() - back])]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back for its lead
    const int need = Utf8Length(b);
    if (need > 1 && back < static_cast<std::size_t>(need)) return std::string();  // hold
    break;
  }
  std::string text = DecodePending();
  std::string out = text.size() > emitted_ ? text.substr(emitted_) : std::string();
  emitted_ = text.size();
  if (!text.empty()) started_ = true;
  if (started_ && t.anchor >= 0) {  // everything pending is emitted: start a new window
    pending_.clear();
    emitted_ = 0;
  }
  return out;
}

std::string StreamDecoder::Flush() {
  std::string text = DecodePending();
  std::string out = text.size() > emitted_ ? text.substr(emitted_) : std::string();
  Reset();
  return out;
}

void StreamDecoder::Reset() {
  pending_.clear();
  emitted_ = 0;
  started_ = false;
}

}  // namespace lm2::runtime
