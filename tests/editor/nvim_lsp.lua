-- A real LSP client drives `recipec lsp`: Neovim's built-in client, headless.
-- Run: RECIPEC=target/debug/recipec RECIPE_FILE=/tmp/x.recipe nvim --headless -u NONE -c "luafile tests/editor/nvim_lsp.lua"
-- Writes "PASS ..." or "FAIL ..." lines to stdout and exits non-zero on failure.

local function out(s) io.stdout:write(s .. "\n") end
local function fail(s) out("FAIL " .. s); vim.cmd("cquit 1") end

local recipec = os.getenv("RECIPEC")
local file = os.getenv("RECIPE_FILE")
vim.cmd("edit " .. file)
local buf = vim.api.nvim_get_current_buf()
local client_id = vim.lsp.start_client({
  name = "recipec",
  cmd = { recipec, "lsp" },
  root_dir = vim.fn.fnamemodify(file, ":p:h"),
})
if not client_id then fail("the client did not start") end
vim.lsp.buf_attach_client(buf, client_id)

-- 1. Diagnostics arrive for the shape error on line 5 (0-based 4).
local got = vim.wait(15000, function() return #vim.diagnostic.get(buf) > 0 end, 50)
if not got then fail("no diagnostics published") end
local d = vim.diagnostic.get(buf)[1]
if d.lnum ~= 4 then fail("diagnostic on line " .. d.lnum .. ", expected 4") end
local code = d.code or (d.user_data and d.user_data.lsp and d.user_data.lsp.code)
if code ~= "E0303" then fail("diagnostic code " .. tostring(code) .. ", expected E0303") end
out("PASS diagnostics: " .. d.message:gsub("\n.*", ""))

-- 2. Hover on `h` reports its dtype and shape.
local uri = vim.uri_from_bufnr(buf)
local res = vim.lsp.buf_request_sync(buf, "textDocument/hover", { textDocument = { uri = uri }, position = { line = 4, character = 17 } }, 10000)
local value = nil
for _, r in pairs(res or {}) do
  if r.result and r.result.contents then value = r.result.contents.value end
end
if not value or not value:find("f32%[N, D%]") then fail("hover: " .. tostring(value)) end
out("PASS hover: " .. value:gsub("\n", " "))

-- 3. Completion offers a stdlib loss after the import path.
res = vim.lsp.buf_request_sync(buf, "textDocument/completion", { textDocument = { uri = uri }, position = { line = 5, character = 5 } }, 10000)
local found = false
for _, r in pairs(res or {}) do
  for _, item in ipairs((r.result and (r.result.items or r.result)) or {}) do
    if item.label == "logsumexp" then found = true end
  end
end
if not found then fail("completion has no `logsumexp`") end
out("PASS completion")

-- 4. Fixing the error clears the diagnostics.
vim.api.nvim_buf_set_lines(buf, 4, 5, false, { "    let logits = h @ c^T" })
local cleared = vim.wait(15000, function() return #vim.diagnostic.get(buf) == 0 end, 50)
if not cleared then fail("diagnostics not cleared after the fix") end
out("PASS live diagnostics cleared")

vim.lsp.stop_client(client_id)
vim.cmd("qall!")
