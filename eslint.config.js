import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'dmstate-data/**', '.readme-test-*/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/no-explicit-any': 'error',
      // src/ must stay deterministic: time and randomness are injected (see src/core/clock.ts).
      'no-restricted-properties': ['error',
        { object: 'Math', property: 'random', message: 'Use the injected seeded RNG (src/core/rng.ts).' },
        { object: 'Date', property: 'now', message: 'Use the injected clock (src/core/clock.ts).' }],
    },
  },
  {
    files: ['bin/**/*.js'],
    languageOptions: { globals: { process: 'readonly', console: 'readonly' } },
  },
);
