// Tokenizer: fixed ids, round trips, streaming decode, chat template.
#include "lm2/runtime/tokenizer.h"

#include <random>

#include <catch2/catch.hpp>

#include "loader_test_util.h"

using namespace lm2::runtime;
using namespace lm2::testing;

namespace {

std::unique_ptr<Tokenizer> OpenOk(const std::string& dir) {
  auto tok = Tokenizer::Open(dir);
  INFO(tok.status().ToString());
  REQUIRE(tok.ok());
  return std::move(tok).value();
}

bool ValidUtf8(const std::string& s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    int n = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || i + static_cast<std::size_t>(n) > s.size()) return false;
    for (int k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]) & 0xC0) != 0x80) return false;
    }
    i += static_cast<std::size_t>(n);
  }
  return true;
}

// Streams `ids` through a decoder; checks each chunk is whole UTF-8; returns the text.
std::string Stream(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  StreamDecoder dec = tok.NewStreamDecoder();
  std::string out;
  for (int32_t id : ids) {
    auto chunk = dec.Push(id);
    REQUIRE(chunk.ok());
    CHECK(ValidUtf8(*chunk));
    out += *chunk;
  }
  return out + dec.Flush();
}

const std::vector<std::string> kTexts = {
    "Mary went to the kitchen.",
    "Where is John? John is in the garden.",
    "héllo wörld, ça va?",
    "日本語のテキストです",
    "emoji 😀👍🏽 and math ∑∫ ok",
    "Ωmega ελληνικά кириллица",
    "<|user|> How are you today? <|end|> <|assistant|> I am fine, thank you. <|end|>",
};

}  // namespace

TEST_CASE("tokenizer: fixed control ids and chat symbols", "[tokenizer]") {
  auto tok = OpenOk(TestModel("tiny-lm2"));
  CHECK(tok->vocab_size() == 512);
  CHECK(tok->unk_id() == 0);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->pad_id() == 3);
  CHECK(tok->user_id() == 4);
  CHECK(tok->assistant_id() == 5);
  CHECK(tok->end_id() == 6);
  CHECK(tok->IdToPiece(5) == "<|assistant|>");
  CHECK(tok->PieceToId("<|end|>") == 6);
  CHECK(tok->PieceToId("no such piece") == -1);
  CHECK(tok->IdToPiece(512).empty());
  CHECK(tok->IsControl(1));
  CHECK(tok->IsControl(2));
  CHECK_FALSE(tok->IsControl(4));  // user-defined: visible text
  CHECK(tok->IsByte(tok->PieceToId("<0x0A>")));
  for (const char* sym : {"<|user|>", "<|assistant|>", "<|end|>"}) {
    auto ids = tok->Encode(std::string("a ") + sym + " b");
    REQUIRE(ids.ok());
    CHECK(std::count(ids->begin(), ids->end(), tok->PieceToId(sym)) == 1);
  }
}

TEST_CASE("tokenizer: encodes like the Python sentencepiece and round-trips", "[tokenizer]") {
  auto tok = OpenOk(TestModel("tiny-lm2"));
  // Ids from python3-sentencepiece on the same tokenizer.model.
  auto ids = tok->Encode("<|user|> How are you today? <|end|> <|assistant|>");
  REQUIRE(ids.ok());
  CHECK(*ids == std::vector<int32_t>{454, 4, 446, 447, 322, 448, 477, 454, 6, 454, 5});
  auto bytes = tok->Encode("héllo");
  REQUIRE(bytes.ok());
  CHECK(*bytes == std::vector<int32_t>{454, 460, 202, 176, 278, 458});  // é by byte fallback
  for (const std::string& text : kTexts) {
    auto enc = tok->Encode(text);
    REQUIRE(enc.ok());
    auto dec = tok->Decode(*enc);
    REQUIRE(dec.ok());
    CHECK(*dec == text);
  }
  auto with_controls = tok->Decode({1, 454, 446, 2, 3});
  REQUIRE(with_controls.ok());
  CHECK(*with_controls == "How");
  CHECK(tok->Decode({5, -1}).status().IsInvalidArgument());
  CHECK(tok->Decode({512}).status().IsInvalidArgument());
}

TEST_CASE("tokenizer: streaming decode equals full decode, never splitting a character", "[tokenizer]") {
  auto tok = OpenOk(TestModel("tiny-lm2"));
  for (const std::string& text : kTexts) {
    auto ids = tok->Encode(text);
    REQUIRE(ids.ok());
    CHECK(Stream(*tok, *ids) == text);
  }
  // A 4-byte character arrives as four byte pieces: nothing comes out until the last.
  auto ids = tok->Encode("😀");
  REQUIRE(ids.ok());
  StreamDecoder dec = tok->NewStreamDecoder();
  std::vector<std::string> chunks;
  for (int32_t id : *ids) chunks.push_back(*dec.Push(id));
  REQUIRE(chunks.size() >= 4);
  for (std::size_t i = 0; i + 1 < chunks.size(); ++i) CHECK(chunks[i].empty());
  CHECK(chunks.back() == "😀");
  CHECK(dec.Push(9999).status().IsInvalidArgument());

  // Random id sequences (control, byte, chat and ordinary pieces, invalid UTF-8 runs
  // included) decode the same streamed as at once.
  std::mt19937 rng(7);
  for (int iter = 0; iter < 300; ++iter) {
    std::vector<int32_t> seq(1 + rng() % 40);
    for (auto& id : seq) {
      const auto r = rng() % 10;
      id = r < 3 ? static_cast<int32_t>(7 + rng() % 256)              // byte pieces
           : r < 4 ? static_cast<int32_t>(rng() % 7)                  // control and chat
                   : static_cast<int32_t>(rng() % 512);
    }
    auto full = tok->Decode(seq);
    REQUIRE(full.ok());
    INFO("iteration " << iter);
    CHECK(Stream(*tok, seq) == *full);
  }
  // Streamed UTF-8 text made only of byte pieces, cut at every point, then continued.
  auto multi = tok->Encode("日本 😀 é");
  REQUIRE(multi.ok());
  CHECK(Stream(*tok, *multi) == *tok->Decode(*multi));
}

TEST_CASE("tokenizer: chat template from the model directory", "[tokenizer]") {
  auto tok = OpenOk(TestModel("tiny-lm2"));
  const ChatTemplate& t = tok->chat_template();
  CHECK(t.add_bos);
  CHECK(t.user_prefix == "<|user|> ");
  CHECK(t.assistant_prefix == "<|assistant|>");
  CHECK(tok->stop_ids() == std::vector<int32_t>{6, 2});
  auto first = tok->RenderUserTurn("How are you today?", /*first_turn=*/true);
  REQUIRE(first.ok());
  CHECK(*first == std::vector<int32_t>{1, 4, 446, 447, 322, 448, 477, 6, 5});
  auto later = tok->RenderUserTurn("How are you today?", /*first_turn=*/false);
  REQUIRE(later.ok());
  CHECK(*later == std::vector<int32_t>(first->begin() + 1, first->end()));
  CHECK(*tok->Decode(*later) == "<|user|> How are you today?<|end|><|assistant|>");

  // A custom template: no BOS, other framing, two stop pieces.
  TempDir dir;
  CopyModel("tiny-lm2", dir.str());
  ChatTemplate custom;
  custom.add_bos = false;
  custom.user_prefix = "Q: ";
  custom.user_suffix = "\n";
  custom.assistant_prefix = "A:";
  custom.stop = {"<|end|>", "<|user|>"};
  WriteFile(dir / "chat_template.json", custom.ToJson());
  auto tok2 = OpenOk(dir.str());
  CHECK(tok2->stop_ids() == std::vector<int32_t>{6, 4, 2});
  auto r = tok2->RenderUserTurn("Hi", true);
  REQUIRE(r.ok());
  CHECK(*r == *tok2->Encode("Q: Hi\nA:"));
  CHECK(r->front() != 1);

  // No file: the default built from the control symbols.
  std::filesystem::remove(dir / "chat_template.json");
  auto tok3 = OpenOk(dir.str());
  CHECK(*tok3->RenderUserTurn("How are you today?", true) == *first);

  // Bad files are InvalidArgument naming the problem.
  const std::pair<std::string, std::string> bad[] = {
      {"{", "not valid JSON"},
      {R"({"add_bos": true})", "format"},
      {R"({"format": "lm2-chat-template-9"})", "format"},
      {R"({"format": "lm2-chat-template-1", "add_bos": "yes"})", "add_bos"},
      {R"({"format": "lm2-chat-template-1", "user_prefix": 3})", "user_prefix"},
      {R"({"format": "lm2-chat-template-1", "system_prefix": ""})", "unknown key"},
      {R"({"format": "lm2-chat-template-1", "stop": "<|end|>"})", "stop"},
      {R"({"format": "lm2-chat-template-1", "stop": ["<|end|> and more"]})", "not a single piece"},
  };
  for (const auto& [text, needle] : bad) {
    WriteFile(dir / "chat_template.json", text);
    auto t4 = Tokenizer::Open(dir.str());
    INFO(text << " -> " << t4.status().ToString());
    REQUIRE_FALSE(t4.ok());
    CHECK(t4.status().IsInvalidArgument());
    CHECK(std::string(t4.status().message()).find(needle) != std::string::npos);
  }
  // Round trip of the file format.
  auto parsed = ChatTemplate::FromJson(custom.ToJson());
  REQUIRE(parsed.ok());
  CHECK(parsed->ToJson() == custom.ToJson());
}

TEST_CASE("tokenizer: missing or broken tokenizer.model", "[tokenizer]") {
  TempDir dir;
  CHECK(Tokenizer::Open(dir.str()).status().IsNotFound());
  WriteFile(dir / "tokenizer.model", "this is not a protobuf");
  auto tok = Tokenizer::Open(dir.str());
  REQUIRE_FALSE(tok.ok());
  CHECK(tok.status().IsCorruption());
}
