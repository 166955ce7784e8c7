" Vim/Neovim syntax for .recipe files (recipec). Copy to ~/.config/nvim/syntax/recipe.vim.
if exists("b:current_syntax")
  finish
endif

syn keyword recipeKeyword use pub fn let if else for in with every
syn keyword recipeItem loss optimizer schedule sparsity decode model recipe param buffer state sub optimize sparsify freeze
syn keyword recipeType f32 f16 bf16 f64 i32 i64 bool str
syn keyword recipeConstant true false inf pi
syn keyword recipeBuiltinVar step grad mask batch
syn match recipeNumber "\<[0-9][0-9_]*\(\.[0-9][0-9_]*\)\=\([eE][+-]\=[0-9]\+\)\=\>"
syn region recipeString start=+"+ skip=+\\.+ end=+"+ oneline
syn match recipeTranspose "\^T\>"
syn match recipeOperator "[-+*/%^@<>=!?:]\|&&\|||\|->\|\.\."
syn match recipeComment "//.*$"
syn match recipeDocComment "///.*$"
syn match recipeModuleDoc "//!.*$"
syn match recipeFunction "\<[A-Za-z_][A-Za-z0-9_]*\ze\s*("

hi def link recipeKeyword Keyword
hi def link recipeItem Structure
hi def link recipeType Type
hi def link recipeConstant Constant
hi def link recipeBuiltinVar Identifier
hi def link recipeNumber Number
hi def link recipeString String
hi def link recipeTranspose Operator
hi def link recipeOperator Operator
hi def link recipeComment Comment
hi def link recipeDocComment SpecialComment
hi def link recipeModuleDoc SpecialComment
hi def link recipeFunction Function

let b:current_syntax = "recipe"
