# install(EXPORT), package config and version files. (Filled in by the packaging work.)
