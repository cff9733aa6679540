const config = {
  requirePragma: true,
};

module.exports = config;
