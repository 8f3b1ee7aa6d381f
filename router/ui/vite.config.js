// Vite builds the UI into the router's OUT_DIR (router/build.rs passes --outDir and --base).
import { defineConfig } from "vite";

export default defineConfig({
  build: {
    target: "es2020",
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 300,
  },
});
