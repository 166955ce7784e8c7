-- recipec for Neovim (0.7 or later): filetype detection and the language server.
-- Put this file in your config (e.g. ~/.config/nvim/plugin/recipe.lua), with `recipec`
-- on your PATH (`cargo install --path recipec`).

vim.filetype = vim.filetype or {}
vim.cmd([[autocmd BufRead,BufNewFile *.recipe setfiletype recipe]])
vim.cmd([[autocmd FileType recipe setlocal commentstring=//\ %s]])

vim.api.nvim_create_autocmd("FileType", {
  pattern = "recipe",
  callback = function(args)
    local root = vim.fn.fnamemodify(vim.api.nvim_buf_get_name(args.buf), ":p:h")
    local id = vim.lsp.start_client({ name = "recipec", cmd = { "recipec", "lsp" }, root_dir = root })
    if id then
      vim.lsp.buf_attach_client(args.buf, id)
    end
  end,
})
