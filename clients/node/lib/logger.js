// The logger the Worker and the Service write to: the caller's (anything with
// debug/info/warn/error methods), none at all (null or false), or by default
// warnings and errors on the console under a `[zbroker <who>]` prefix.

const noop = () => {}

export function makeLogger (logger, who) {
  if (logger === null || logger === false) return { debug: noop, info: noop, warn: noop, error: noop }
  if (logger === undefined) {
    return {
      debug: noop,
      info: noop,
      warn: (...args) => console.warn(`[zbroker ${who}]`, ...args),
      error: (...args) => console.error(`[zbroker ${who}]`, ...args)
    }
  }
  const bind = (name) => typeof logger[name] === 'function' ? logger[name].bind(logger) : noop
  return { debug: bind('debug'), info: bind('info'), warn: bind('warn'), error: bind('error') }
}
